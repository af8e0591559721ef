//! backforth: instruction back-and-forth translation as a columnar dataflow.
//!
//! Web documents become candidate responses (`prepare`), an LLM writes the instruction each
//! answers (`backtranslate`), an LLM scores each pair and SQL keeps the best (`score`,
//! `curate`), and an LLM rewrites each kept text into an assistant-quality answer (`rewrite`).
//! Stages are SQL over Parquet run by DataFusion; LLM calls are async UDFs.
//!
//! The layout, from the command line down: `cli` parses and dispatches; `job` is the job file
//! and the catalog of built-in stages and functions; `run` executes a job into an output
//! root whose contract is `root`; `engine` holds every DataFusion trait implementation;
//! `llm` talks to models; `prepare` turns documents into candidates; `parse` reads LLM
//! output; `outputs` is what users read back (stats, report, export, seed, estimate).
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod cli;
pub mod engine;
pub mod error;
pub mod escape;
pub mod job;
pub mod llm;
pub mod outputs;
pub mod parse;
pub mod prepare;
pub mod root;
pub mod run;
pub mod storage;
