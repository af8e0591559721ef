//! The one integration-test binary (each file directly under tests/ would link its own).

mod batch;
mod catalog;
mod concurrency;
mod crash;
mod dedup;
mod examples;
mod export;
mod faults;
mod fuzz;
mod hostile;
mod ingest;
mod inputs;
mod jobs;
mod limits;
mod parse;
mod pipeline;
mod prepare;
mod quality;
mod reasoning;
mod report;
mod resume;
mod s3;
mod schemas;
mod seed;
mod stats;
mod support;
