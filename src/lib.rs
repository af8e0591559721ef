//! backforth: instruction back-and-forth translation as a columnar dataflow.
//!
//! Web documents become candidate responses (`prepare`), an LLM writes the instruction each
//! answers (`backtranslate`), an LLM scores each pair and SQL keeps the best (`score`,
//! `curate`), and an LLM rewrites each kept text into an assistant-quality answer (`rewrite`).
//! Stages are SQL over Parquet run by DataFusion; LLM calls are async UDFs.
#![deny(missing_docs)]

pub mod cli;
pub mod error;
pub mod estimate;
pub mod exec;
pub mod export;
pub mod ingest;
pub mod job;
pub mod journal;
pub mod limits;
pub mod llm;
pub mod manifest;
pub mod minhash;
pub mod openai_batch;
pub mod pipeline;
pub mod progress;
pub mod quality;
pub mod report;
pub mod seed;
pub mod stats;
pub mod storage;
pub mod text;
pub mod tokens;
pub mod udf;
pub mod worker;
