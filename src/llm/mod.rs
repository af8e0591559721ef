//! Talking to models: the client of each model role and its backends (HTTP, the offline mock,
//! batch capture), endpoints with their admission and rate limits, and the response journal
//! that makes a paid call answer every later run.

pub mod budget;
pub mod capture;
pub mod client;
pub mod endpoint;
pub mod journal;
pub mod limits;
pub mod mock;
pub mod pool;
pub mod reply;
pub mod retry;
pub mod wire;
