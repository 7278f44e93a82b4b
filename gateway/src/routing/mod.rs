//! Routes as they run: a path's current version (settings and plugin,
//! swapped atomically on reload), its hub and its connection count
//! ([`route`]), tenants and what they use ([`tenant`]), the table from
//! host and path to route ([`router`]), and the host-name lookup it shares
//! with TLS certificate selection ([`hosts`]).

pub mod hosts;
pub mod route;
pub mod router;
pub mod tenant;
