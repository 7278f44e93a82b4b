//! Routes as they run: a path's current version (settings and plugin,
//! swapped atomically on reload), its hub and its connection count
//! ([`route`]), and the table from paths to routes ([`router`]).

pub mod route;
pub mod router;
