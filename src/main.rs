//! The `backforth` command; everything it does lives in the library's `cli` module.

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    backforth::cli::main()
}
