//! The `backforth` command; everything it does lives in the library's `cli` module.

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h; the Rust bindings give it no name.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Freed pages go back to the OS at once, not a second later: with a second's delay, pages
    // freed by one shard and not yet reused by the next piled up, and peak RSS grew with the
    // length of the run (+27% at ten times the documents, +9% with no delay; same CPU per
    // request, docs/performance.md). `MIMALLOC_PURGE_DELAY` still overrides it.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it at each purge.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
    backforth::cli::main()
}
