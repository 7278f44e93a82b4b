//! The `wasmgate` binary's memory allocator (the library leaves that choice
//! to whoever embeds it).
//!
//! mimalloc, for one reason: memory a connection frees (an instance
//! released by hibernation, a closed connection's buffers) goes back to the
//! system. glibc's malloc keeps freed chunks inside its heap, so RSS stays
//! at its high-water mark. mimalloc returns free pages (in runs of 64 KiB
//! or more) to the system once they have been free for its `purge_delay`,
//! 1 s by default, but it only looks when the owning thread next calls the
//! allocator; a gateway's worker threads go quiet exactly when its
//! connections do, so pages freed by the last hibernations would stay. The
//! delay is set to 0: pages are returned as they become free. Measured on
//! the echo benchmarks, this costs nothing visible (docs/performance.md).

use std::ffi::c_int;

/// The global allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (include/mimalloc.h;
/// libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// Returns free pages to the system as soon as they are free. Call first
/// thing in `main`.
pub fn configure() {
    // SAFETY: sets a plain integer option; mimalloc reads options lazily,
    // so this applies to every later purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_configured() {
        // mimalloc 3's default purge delay is 1000 ms; no neighbouring option
        // defaults to that, so this checks the option's number.
        // SAFETY: reads and sets plain integer options.
        unsafe {
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 1000);
            }
            configure();
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 0);
        }
    }
}
