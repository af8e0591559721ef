//! What backforth's tests and benchmarks share: an OpenAI-compatible fake server started on
//! 127.0.0.1 (deterministic answers, injected faults, request counters and a request log)
//! and a seeded random source for generated data.

pub mod fake_server;
pub mod rng;
