//! What the tests share: running the binary and reading its outputs (`util`), and from the
//! testkit crate (also used by the benchmarks) the fake server and the random source.

pub mod cutter;
pub mod util;

pub use backforth_testkit::{fake_server, rng};
