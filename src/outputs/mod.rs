//! What a finished run gives its users: `stats` and `report` on what the data looks like,
//! `export` of the pairs for trainers, `seed` pairs to mix in, `estimate` before paying, and
//! the OpenAI Batch API client behind `batch`.

pub mod batch_api;
pub mod estimate;
pub mod export;
pub mod report;
pub mod seed;
pub mod stats;
