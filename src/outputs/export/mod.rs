//! Writing final pairs in the formats trainers read: OpenAI chat JSONL, ShareGPT, Alpaca, and
//! Parquet with a `messages` column. Synthetic pairs can be sampled to a size and mixed with
//! seed pairs, each side tagged as the papers do, with a dataset card written beside them.

use std::sync::Arc;

use clap::ValueEnum;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::job_error;
use crate::root::names::JOB_FILE;
use crate::root::objects::parquet_of;
use crate::root::tables::{open_root, register_seed};
use crate::storage::Location;

mod card;
mod formats;
mod hf;
mod preference;

use card::*;
use formats::*;
use hf::*;
use preference::*;

pub use card::dataset_card;
pub use formats::{encode, render_pair};
pub use hf::{Split, hf_files, hf_front_matter, hf_pairs_folder};
pub use preference::{Preference, render_preference};

/// The tag BaF and Humpback give synthetic pairs.
pub const WEB_TAG: &str = "Answer with knowledge from web search.";

/// The tag BaF and Humpback give seed pairs.
pub const SEED_TAG: &str = "Answer in the style of an AI Assistant.";

/// First line of a dataset card written by `export`; an existing card file without it is
/// someone else's and is never overwritten.
const CARD_MARK: &str = "<!-- written by backforth export -->";

/// Output formats of `backforth export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `{"messages": [{"role": ..., "content": ...}, ...]}` per line.
    OpenaiChat,
    /// `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}` per line.
    Sharegpt,
    /// `{"instruction", "input", "output"[, "system"]}` per line.
    Alpaca,
    /// Parquet with `id` and a `messages` list of (role, content) structs.
    Parquet,
    /// Preference pairs for DPO (TRL's conversational layout): `prompt`, `chosen` and
    /// `rejected` message lists per line, with `score_chosen` and `score_rejected`.
    Preference,
    /// A folder Hugging Face `datasets.load_dataset` reads as it is:
    /// `data/<split>-NNNNN-of-NNNNN.parquet` with `messages` and provenance columns, and a
    /// README.md card with the Hub's YAML header.
    Hf,
}

impl Format {
    /// File extension of the format.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            _ => "jsonl",
        }
    }
}

/// Where the tag sentence goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TagMode {
    /// No tag.
    None,
    /// As a system message (Alpaca: a `system` field).
    System,
    /// Appended to the instruction after a blank line.
    Append,
}

/// What to export and how.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Output root of a run.
    pub root: String,
    /// Stage table holding the pairs (`rewritten`, `curated`, `distilled`, ...).
    pub table: String,
    /// Output format.
    pub format: Format,
    /// Output file (path or URL).
    pub output: String,
    /// Tag placement.
    pub tag: TagMode,
    /// Tag sentence of the synthetic pairs.
    pub tag_text: String,
    /// Directory written by `backforth seed`, whose pairs are mixed in.
    pub seed: Option<String>,
    /// Tag sentence of the seed pairs.
    pub seed_tag_text: String,
    /// Synthetic pairs to sample (all when `None`).
    pub size: Option<usize>,
    /// Seed of the sampling and of the mixed order.
    pub sample_seed: u64,
    /// Write a dataset card (`<name>.card.md`) beside the output.
    pub card: bool,
    /// `--format hf`: the share of pairs held out as the `test` split.
    pub test_fraction: f64,
    /// `--format hf`: the license the card declares.
    pub license: String,
}

/// One exported pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Row id (candidate id, or the seed reply's message id).
    pub id: String,
    /// The instruction.
    pub instruction: String,
    /// The response.
    pub response: String,
    /// The tag sentence of the pair's origin, placed as the export's tag mode says.
    pub tag: Option<String>,
    /// `web` (synthetic) or `seed`.
    pub origin: &'static str,
    /// The pair's score, when its table has one.
    pub score: Option<f64>,
    /// The web document it was made from, when its table says.
    pub doc_id: Option<String>,
}

impl Pair {
    /// A pair without a tag.
    pub fn untagged(id: &str, instruction: &str, response: &str) -> Self {
        Self {
            id: id.to_string(),
            instruction: instruction.to_string(),
            response: response.to_string(),
            tag: None,
            origin: "seed",
            score: None,
            doc_id: None,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportCounts {
    /// Synthetic pairs available in the table.
    pub available: u64,
    /// Synthetic pairs written.
    pub synthetic: u64,
    /// Seed pairs written.
    pub seed: u64,
    /// Whether they are preferences (chosen and rejected answers) rather than pairs.
    pub preferences: bool,
}

/// Exports `opts.table` under `opts.root`, sampled and mixed with seed pairs as asked.
pub async fn export(opts: &ExportOptions) -> Result<ExportCounts> {
    let root = Location::parse(&opts.root)?;
    let (ctx, stages) = open_root(&root).await?;
    if !stages.contains(&opts.table) {
        return job_error!(
            "{} has no complete '{}' stage (complete: {})",
            root.describe(),
            opts.table,
            stages.join(", ")
        );
    }
    let schema = ctx.table(&opts.table).await?.schema().clone();
    let preferences = schema.has_column_with_unqualified_name("chosen")
        && schema.has_column_with_unqualified_name("rejected");
    if opts.format == Format::Preference || (opts.format == Format::Hf && preferences) {
        return export_preferences(opts, &ctx, &schema).await;
    }
    let mut synthetic = read_pairs(&ctx, &opts.table).await?;
    let available = synthetic.len() as u64;
    sample(opts, &mut synthetic, |p| &p.id, "pairs")?;
    for pair in &mut synthetic {
        pair.tag = Some(opts.tag_text.clone());
        pair.origin = "web";
    }
    let mut seed = match &opts.seed {
        Some(dir) => read_seed(dir).await?,
        None => Vec::new(),
    };
    for pair in &mut seed {
        pair.tag = Some(opts.seed_tag_text.clone());
    }
    let counts = ExportCounts {
        available,
        synthetic: synthetic.len() as u64,
        seed: seed.len() as u64,
        preferences: false,
    };
    let mut pairs: Vec<(String, Pair)> = seed
        .into_iter()
        .map(|p| (sample_key(opts.sample_seed, "seed", &p.id), p))
        .chain(
            synthetic
                .into_iter()
                .map(|p| (sample_key(opts.sample_seed, "web", &p.id), p)),
        )
        .collect();
    // Without a seed the order is the table's (by id); mixed, the two origins interleave in
    // an order fixed by the sampling seed.
    if opts.seed.is_some() {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let pairs: Vec<Pair> = pairs.into_iter().map(|(_, p)| p).collect();
    if opts.format == Format::Hf {
        let encode = |chunk: &[Pair]| parquet_bytes(chunk, opts.tag, true);
        write_hf(opts, &pairs, |p| &p.id, encode, PAIR_FEATURES, &counts).await?;
        return Ok(counts);
    }
    if opts.card {
        check_card_place(opts).await?;
    }
    write_file(&opts.output, encode(&pairs, opts.format, opts.tag)?).await?;
    if opts.card {
        write_card(opts, &counts).await?;
    }
    Ok(counts)
}

/// `--size N`: keeps the N `rows` (of `what`, for the message) that come first by their
/// [`sample_key`]; all of them without `--size`.
fn sample<T>(
    opts: &ExportOptions,
    rows: &mut Vec<T>,
    id: impl Fn(&T) -> &str,
    what: &str,
) -> Result<()> {
    let Some(size) = opts.size else {
        return Ok(());
    };
    if size > rows.len() {
        return job_error!(
            "--size {size}: '{}' holds only {} {what}; ask for at most that many",
            opts.table,
            rows.len()
        );
    }
    rows.sort_by_cached_key(|row| sample_key(opts.sample_seed, "web", id(row)));
    rows.truncate(size);
    Ok(())
}

/// Where a pair falls in a sample: a hash of the sampling seed, its origin and its id, so the
/// same seed picks the same pairs whatever order the table is read in.
fn sample_key(seed: u64, origin: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(
        format!("{seed}\u{0}{origin}\u{0}{id}").as_bytes(),
    ))
}

async fn read_pairs(ctx: &datafusion::prelude::SessionContext, table: &str) -> Result<Vec<Pair>> {
    let schema = ctx.table(table).await?.schema().clone();
    // Rewritten and distilled pairs answer in `response`; filter-only pairs keep the web text.
    let response = if schema.has_column_with_unqualified_name("response") {
        "response"
    } else if schema.has_column_with_unqualified_name("text") {
        "text"
    } else {
        return job_error!("table '{table}' has neither a 'response' nor a 'text' column");
    };
    if !schema.has_column_with_unqualified_name("instruction") {
        return job_error!("table '{table}' has no 'instruction' column");
    }
    let optional = |column: &str, as_type: &str| {
        if schema.has_column_with_unqualified_name(column) {
            format!("CAST({column} AS {as_type})")
        } else {
            format!("CAST(NULL AS {as_type})")
        }
    };
    let sql = format!(
        "SELECT id, instruction, {response} AS response, {} AS score, {} AS doc_id \
         FROM {table} WHERE instruction IS NOT NULL AND {response} IS NOT NULL ORDER BY id",
        optional("score", "DOUBLE"),
        optional("doc_id", "VARCHAR"),
    );
    let mut stream = ctx.sql(&sql).await?.execute_stream().await?;
    let mut pairs = Vec::new();
    while let Some(batch) = stream.next().await {
        pairs.extend(batch_pairs(&batch?)?);
    }
    Ok(pairs)
}

async fn read_seed(dir: &str) -> Result<Vec<Pair>> {
    let ctx = datafusion::prelude::SessionContext::new();
    register_seed(&ctx, dir).await?;
    read_pairs(&ctx, "seed").await
}

async fn write_file(output: &str, bytes: Vec<u8>) -> Result<()> {
    let location = Location::parse(output)?;
    location
        .store
        .put(&location.prefix, PutPayload::from(bytes))
        .await?;
    Ok(())
}

/// The last name of a location's path: the file, or the folder, an export writes.
fn last_name(location: &Location) -> &str {
    location
        .prefix
        .as_ref()
        .rsplit('/')
        .next()
        .unwrap_or_default()
}
