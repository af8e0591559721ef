//! The `backforth` command; everything it does lives in the library's `cli` module.

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (`_RJEM_MALLOC_CONF` in the environment overrides
/// them). Freed pages go back to the OS within about a second, by jemalloc's background thread,
/// rather than after its default 10 s; returning each at once (decay 0) kept resident memory on
/// the live heap but cost 60% more CPU per request at the job bench's ceiling
/// (docs/performance.md).
// SAFETY: jemalloc declares this symbol weak and reads it as a `const char *`; the reference
// is a thin pointer to a NUL-terminated string that lives for the whole program.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    backforth::cli::main()
}
