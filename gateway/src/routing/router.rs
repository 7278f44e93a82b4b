//! The routing table: request path to [`Route`], swapped as a whole when
//! the config is reloaded (routes added or removed), read lock-free on every
//! upgrade.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::routing::route::Route;

/// Paths to routes, in config order for listing.
#[derive(Debug, Default)]
pub struct Table {
    by_path: HashMap<String, Arc<Route>>,
    order: Vec<Arc<Route>>,
}

impl Table {
    /// A table of `routes`, in this order.
    pub fn new(routes: Vec<Arc<Route>>) -> Table {
        let by_path = routes.iter().map(|r| (r.path.clone(), r.clone())).collect();
        Table {
            by_path,
            order: routes,
        }
    }

    /// The route for `path`.
    pub fn get(&self, path: &str) -> Option<&Arc<Route>> {
        self.by_path.get(path)
    }

    /// Every route, in config order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.order
    }
}

/// The current routing table.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<Table>,
}

impl Router {
    /// A router serving `table`.
    pub fn new(table: Table) -> Router {
        Router {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// The table as it is now.
    pub fn load(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// The route for `path`, as of now.
    pub fn get(&self, path: &str) -> Option<Arc<Route>> {
        self.table.load().get(path).cloned()
    }

    /// Replaces the table.
    pub fn store(&self, table: Table) {
        self.table.store(Arc::new(table));
    }
}
