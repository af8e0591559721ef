//! The `backforth` command; everything it does lives in the library's `cli` module.

use std::process::ExitCode;

fn main() -> ExitCode {
    backforth::cli::main()
}
