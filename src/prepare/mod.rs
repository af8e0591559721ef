//! Web documents to candidate responses, at Parquet speed: reading documents, cutting them
//! into units, the quality rules, exact-dedup keys, MinHash signatures, token counts, and the
//! benchmark n-gram index of decontamination.

pub mod bytes;
pub mod decontaminate;
pub mod dedup_key;
pub mod ingest;
pub mod minhash;
pub mod quality;
pub mod segment;
pub mod tokens;
