//! The binary runs with the allocator options `src/main.rs` compiles in: jemalloc reads them
//! from a weak symbol, so a renamed one (a changed prefix) would drop them without an error.

use std::process::Command;

#[test]
fn the_binary_returns_freed_pages_within_a_second() {
    // `stats_print` makes jemalloc print its options as it exits; it is appended to the
    // compiled-in options, which it must not replace.
    let out = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for option in [
        "opt.background_thread: true",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
    ] {
        assert!(stderr.contains(option), "{option} missing from:\n{stderr}");
    }
}
