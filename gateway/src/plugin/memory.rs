//! How much linear memory an instance may have: at most `[sandbox]
//! max_memory` on its own, and, for a tenant with `max_memory_total`, no
//! more than what is left of the tenant's total over all its instances.
//!
//! wasmtime asks the [`Limiter`] before every memory is created and grown.
//! A refused grow fails the guest's `memory.grow` (it returns -1): a guest
//! that cannot allocate usually traps, and its connection is closed with
//! 1011, while the tenant's other connections keep running. What an
//! instance holds is given back to the tenant when it is dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use wasmtime::ResourceLimiter;

use crate::routing::tenant::Tenant;

/// Most table elements an instance may grow a table to (funcref tables of
/// large guests hold some tens of thousands).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The memory limits of one instance.
#[derive(Debug)]
pub struct Limiter {
    max_memory: usize,
    tenant: Arc<Tenant>,
    /// Bytes this instance counts against its tenant now.
    held: usize,
}

impl Limiter {
    /// Limits for an instance of `tenant` with at most `max_memory` bytes of
    /// linear memory.
    pub fn new(max_memory: usize, tenant: Arc<Tenant>) -> Limiter {
        Limiter {
            max_memory,
            tenant,
            held: 0,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            return Ok(false);
        }
        let more = desired.saturating_sub(current);
        if let Some(total) = self.tenant.quotas.max_memory_total {
            let used = &self.tenant.counts.memory;
            let ok = used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    n.checked_add(more).filter(|&m| m <= total)
                })
                .is_ok();
            if !ok {
                if let Some(suppressed) = self.tenant.counts.instance_errors.admit() {
                    tracing::warn!(
                        tenant = %self.tenant.name, suppressed,
                        "an instance's memory grow to {desired} bytes was refused: the tenant's instances would pass max_memory_total ({total} bytes)"
                    );
                }
                return Ok(false);
            }
        } else {
            self.tenant.counts.memory.fetch_add(more, Ordering::AcqRel);
        }
        self.held += more;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.tenant
            .counts
            .memory
            .fetch_sub(self.held, Ordering::AcqRel);
    }
}
