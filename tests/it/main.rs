//! The one integration-test binary (each file directly under tests/ would link its own).

mod fake_server;
mod parse;
mod pipeline;
mod prepare;
mod util;
