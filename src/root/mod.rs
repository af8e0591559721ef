//! The output root's contract: what a run leaves under its root and how it is read back.
//!
//! Each stage is a folder of Parquet parts, with rows it dropped under `_dropped/`, one marker
//! per published shard under `_shards/` and `_SUCCESS` written last. The runner writes this
//! layout; `sql`, `stats`, `report`, `export` and `batch` read it through here.

pub mod marker;
pub mod names;
pub mod objects;
pub mod tables;
