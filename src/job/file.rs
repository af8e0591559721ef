//! The job file as written: TOML, deserialised as is, with `extends` merged underneath.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::job_error;
use crate::prepare::ingest::BadLinePolicy;
use crate::prepare::segment::CandidateMode;

/// Which OpenAI-compatible API a model is called through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /chat/completions` with one user message (and an optional system message).
    #[default]
    Chat,
    /// `POST /completions` with the rendered prompt as is (base or fine-tuned base models).
    Completions,
}

/// A job file as written. A file may start from another with `extends = "base.toml"`,
/// changing only what differs; relative paths then resolve against the extending file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    /// Name shown in logs and the run summary; defaults to the file name.
    pub name: Option<String>,
    /// Where the documents come from.
    pub input: InputConfig,
    /// Output root (path or URL); every stage writes `<output>/<stage>/`.
    pub output: String,
    /// Candidate preparation.
    #[serde(default)]
    pub prepare: PrepareConfig,
    /// Self-curation threshold.
    #[serde(default)]
    pub curate: CurateConfig,
    /// Model roles (`backward`, `scorer`, `rewriter`, or any name a function refers to).
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Per-function overrides of role, template, system message and output length.
    #[serde(default)]
    pub functions: BTreeMap<String, FunctionConfig>,
    /// The stages in order; absent means the paper's pipeline without `distilled`.
    pub stages: Option<Vec<StageConfig>>,
    /// Free-form values available to stage SQL as `{{ params.NAME }}`.
    #[serde(default)]
    pub params: toml::Table,
    /// Engine settings.
    #[serde(default)]
    pub execution: ExecutionConfig,
    /// Benchmarks whose items the `decontaminated` stage drops rows for sharing n-grams with.
    pub decontaminate: Option<DecontaminateConfig>,
}

/// `[decontaminate]`: benchmark files and how overlap with their items is measured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecontaminateConfig {
    /// Words per n-gram (default 13; at least 8).
    pub n: Option<usize>,
    /// `any` (default: at least `threshold` shared n-grams) or `share` (at least a
    /// `threshold` share of the item's n-grams found in the row).
    pub measure: Option<crate::prepare::decontaminate::Measure>,
    /// 1 n-gram by default for `any`, 0.5 for `share`.
    pub threshold: Option<f64>,
    /// N-grams found in more items than this are the benchmark's boilerplate (default 10).
    pub max_items: Option<usize>,
    /// The benchmarks (`[[decontaminate.benchmarks]]`).
    pub benchmarks: Vec<BenchmarkConfig>,
}

/// `[[decontaminate.benchmarks]]`: one benchmark's files and fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkConfig {
    /// Name reported with each match.
    pub name: String,
    /// JSONL or Parquet files, folders (a Hugging Face dataset folder), globs or URLs.
    pub paths: Vec<String>,
    /// Fields of an item whose text is matched, e.g. `["question", "choices", "answer"]`.
    pub fields: Vec<String>,
    /// Field with the item's id (default: file name and row number).
    pub id: Option<String>,
}

/// `[input]`: document files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Files, directories or globs (local), or URLs (`s3://bucket/prefix/`).
    pub paths: Vec<String>,
    /// `error` (default) stops at a malformed line; `skip` counts and skips it.
    #[serde(default)]
    pub on_bad_line: BadLinePolicy,
    /// Longest input line read, in bytes (default 64 MiB); a longer line is a bad line.
    pub max_line_bytes: Option<usize>,
    /// Largest Parquet row group decoded at once (its document columns, uncompressed), in
    /// bytes (default 2 GiB); a larger one stops the run naming the file.
    pub max_row_group_bytes: Option<u64>,
}

/// `[prepare]`: how documents become candidates.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareConfig {
    /// `document` (BaF, default) or `segments` (Humpback).
    pub mode: Option<CandidateMode>,
    /// Minimum characters of a candidate (default: 1 for documents, 600 for segments).
    pub min_chars: Option<usize>,
    /// Maximum characters of a candidate, 0 for none (default: 0 for documents, 3000 for segments).
    pub max_chars: Option<usize>,
    /// Maximum tokens of a candidate (default 3500: just under a 4,096-token context once the
    /// prompt's instructions are added).
    pub max_tokens: Option<usize>,
    /// `cl100k_base`, `o200k_base`, or a path to the served model's `tokenizer.json`.
    pub tokenizer: Option<String>,
    /// Word-trigram Jaccard similarity at which two sentences count as repeats (segments mode).
    pub repeat_jaccard: Option<f64>,
    /// Quality rules, each off unless set (`[prepare.quality]`).
    #[serde(default)]
    pub quality: crate::prepare::quality::QualityRules,
    /// MinHash signatures for near-dedup (`[prepare.near_dedup]`; the `deduped` stage uses
    /// them); absent means no signatures.
    pub near_dedup: Option<crate::prepare::minhash::NearDedup>,
}

/// `[curate]`: which scores are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurateConfig {
    /// Keep pairs scoring at least this (BaF keeps 5, Humpback's k=4 keeps 4 and 5).
    #[serde(default = "default_threshold")]
    pub threshold: i64,
    /// Which scoring iteration decides: 0 is `scored` (M0), 1 is `rescored` (Humpback's M1).
    #[serde(default)]
    pub iteration: u32,
}

impl Default for CurateConfig {
    fn default() -> Self {
        Self {
            threshold: default_threshold(),
            iteration: 0,
        }
    }
}

fn default_threshold() -> i64 {
    5
}

/// `[models.ROLE]`: an endpoint, a model name and sampling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Base URL of an OpenAI-compatible API (`http://host:8000/v1`), or `mock`.
    pub endpoint: Option<String>,
    /// Several base URLs serving the same model (e.g. vLLM replicas): each request goes to the
    /// least-loaded one, and one that keeps failing is rested.
    pub endpoints: Option<Vec<String>>,
    /// Model name sent in each request.
    pub model: String,
    /// `chat` (default) or `completions`.
    #[serde(default)]
    pub api: Api,
    /// Environment variable holding the API key (default `OPENAI_API_KEY`; unset means none).
    pub api_key_env: Option<String>,
    /// Send the key over plain `http://` to a host that is not this machine (off by default:
    /// a key in clear text can be read on the way).
    #[serde(default)]
    pub key_over_http: bool,
    /// Sampling temperature (papers: 1.0).
    pub temperature: Option<f64>,
    /// Nucleus sampling mass (papers: 0.9).
    pub top_p: Option<f64>,
    /// Maximum tokens generated per request.
    pub max_tokens: Option<u32>,
    /// Cap on requests in flight to this endpoint, shared by every stage and partition.
    pub concurrency: Option<usize>,
    /// Seconds before a request is abandoned and retried.
    pub timeout_secs: Option<u64>,
    /// Attempts per request before the row gets an error value (throttled attempts, HTTP
    /// 429, do not count: they have `throttle_secs`).
    pub max_attempts: Option<u32>,
    /// How long a request may keep being throttled (HTTP 429) before the row gets an error
    /// value, counted from its first 429.
    pub throttle_secs: Option<u64>,
    /// Longest reply body read, in bytes (default 1 MiB plus 256 bytes per `max_tokens`); a
    /// longer one is a malformed reply: retried, then an error value on the row.
    pub max_reply_bytes: Option<usize>,
    /// Extra JSON fields merged into each request body (e.g. vLLM's `repetition_penalty`).
    pub extra: Option<toml::Table>,
    /// How much an OpenAI reasoning model thinks (`none`, `minimal`, `low`, `medium`,
    /// `high`): sent as `reasoning_effort`.
    pub reasoning_effort: Option<String>,
    /// Thinking on or off for a model whose chat template reads `enable_thinking` (Qwen3 and
    /// kin on vLLM or SGLang): sent in `chat_template_kwargs`.
    pub thinking: Option<bool>,
    /// Most tokens a call may spend thinking before it must answer: sent as vLLM's
    /// `thinking_token_budget` and as `chat_template_kwargs.thinking_budget` (SGLang, and
    /// Qwen3's template).
    pub thinking_budget: Option<u32>,
    /// Requests per minute allowed to the endpoint.
    pub requests_per_minute: Option<f64>,
    /// Prompt tokens per minute allowed to the endpoint (estimated before sending, corrected
    /// from `usage`).
    pub input_tokens_per_minute: Option<f64>,
    /// Completion tokens per minute allowed to the endpoint (`max_tokens` reserved before
    /// sending, the unused part given back).
    pub output_tokens_per_minute: Option<f64>,
    /// US dollars per million prompt tokens, for cost accounting and the budget.
    pub price_input_per_mtok: Option<f64>,
    /// US dollars per million completion tokens.
    pub price_output_per_mtok: Option<f64>,
    /// US dollars per million prompt tokens read from the server's prompt cache (default: the
    /// input price).
    pub price_cached_input_per_mtok: Option<f64>,
    /// Whether the server answers a function's `n` samples in one request with the API's `n`
    /// (default true: vLLM, SGLang and OpenAI do); false sends one seeded request per sample.
    pub supports_n: Option<bool>,
    /// Seeds every request: `seed` = this plus a hash of the prompt (plus the sample's
    /// number), so a request asked again on another root is answered alike and prompts do not
    /// share one random stream. Unset, only samples carry a seed.
    pub seed: Option<u64>,
}

/// `[functions.NAME]`: overrides for a built-in LLM function, or a new one.
///
/// A new function either copies a built-in (`like = "score_pair"`: its arguments, prompt and
/// modes, usually with another `model`) or is written out in full (`args`, `template`,
/// `model`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// The built-in function this one copies.
    pub like: Option<String>,
    /// Argument names of a new function, which are also its template's variables.
    pub args: Option<Vec<String>>,
    /// Model role the function calls.
    pub model: Option<String>,
    /// Path of a prompt template replacing the built-in one.
    pub template: Option<String>,
    /// System message sent before the prompt (chat API only).
    pub system: Option<String>,
    /// Maximum tokens generated, overriding the role's.
    pub max_tokens: Option<u32>,
    /// `score_pair` only: `text` (default: reasoning, then `Score: N`), `logprobs` (one
    /// token with its most likely alternatives; the expected score over the digits 1-5, and
    /// the text judgement when no digit is among them) or `json` (`{reason, score}` under a
    /// JSON Schema).
    pub mode: Option<String>,
    /// A JSON Schema the replies must follow: a path to a `.json` file, or a table. Sent as
    /// `response_format`, checked on every reply, and read in SQL as the reply's `json` field.
    pub json_schema: Option<toml::Value>,
    /// Replies off the schema asked again, with what was wrong, before the row gets an error
    /// value (default 2).
    pub schema_retries: Option<u32>,
    /// Samples per row (default 1); more make the reply a list of calls, one per sample.
    pub n: Option<u32>,
}

/// `[[stages]]`: one stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Stage and output table name.
    pub name: String,
    /// Path of the stage's SQL; built-in stages have a default.
    pub sql: Option<String>,
    /// A built-in stage whose SQL this one runs under its own name (e.g. a second
    /// `decontaminated` on the final pairs), instead of `sql`.
    pub like: Option<String>,
    /// The table the stage reads (`{{ stage.from }}` in its SQL); built-in stages have a
    /// default (`rewritten` reads `curated`, `filtered` reads `rewritten`, ...).
    pub from: Option<String>,
    /// Values for the stage's SQL as `{{ stage.NAME }}` (e.g. a filter's `min_chars`).
    #[serde(default)]
    pub vars: toml::Table,
}

/// `[execution]`: engine settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionConfig {
    /// Partitions DataFusion plans with (default: number of cores).
    pub target_partitions: Option<usize>,
    /// Rows per shard of a stage that reads the input (default 10,000). Later stages work
    /// shard by shard: a shard is the unit that is committed, skipped on rerun, and split
    /// between workers.
    pub shard_rows: Option<usize>,
    /// Shards of one stage run at the same time (default: enough to keep twice the largest
    /// endpoint cap in rows waiting, at least 2), so no shard's tail leaves the server idle.
    pub concurrent_shards: Option<usize>,
    /// Parquet inputs larger than this many bytes are cut into shards of whole row groups of
    /// about this size (default 256 MiB); every other input file is one shard.
    pub input_shard_bytes: Option<u64>,
    /// Stop cleanly once this run has spent this many US dollars at the models' prices.
    pub budget_usd: Option<f64>,
    /// How long a process waits for units of work that live processes hold, none of them
    /// published meanwhile, before it stops naming them and their holders (unset: as long
    /// as the holders are alive).
    pub wait_secs: Option<u64>,
    /// On a local disk, flush every journal write, spend record and part to the device before
    /// going on (parts before their markers), so a power loss costs nothing paid for
    /// (default false: about 0.2 ms more a response here; object stores need none).
    pub fsync: Option<bool>,
}

/// Overrides given on the command line; they win over the job file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces `[input] paths` (paths relative to the working directory).
    pub inputs: Vec<String>,
    /// Replaces `output` (relative to the working directory).
    pub output: Option<String>,
    /// Sets every model role's endpoints (one URL, or several separated by commas).
    pub endpoint: Option<String>,
    /// Sets every model role's model name.
    pub model: Option<String>,
    /// Sets every endpoint's cap on requests in flight.
    pub concurrency: Option<usize>,
    /// Folders besides the job's own whose files the job may read (templates, schemas, SQL,
    /// benchmarks).
    pub allow_paths: Vec<PathBuf>,
}

/// Reads a job file as a TOML table, with the file it `extends` (a path relative to it)
/// underneath: tables merge key by key, anything else (arrays such as `stages` included) is
/// replaced by the extending file's value.
pub fn read_job_table(path: &Path, depth: usize) -> Result<toml::Table> {
    if depth > 8 {
        return job_error!(
            "{}: `extends` nests more than 8 files deep (a cycle?)",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Job(format!("cannot read job file {}: {e}", path.display())))?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| Error::Job(format!("{}: {e}", path.display())))?;
    let Some(base) = table.remove("extends") else {
        return Ok(table);
    };
    let Some(base) = base.as_str() else {
        return job_error!(
            "{}: `extends` must be a path to another job file",
            path.display()
        );
    };
    let base_path = path.parent().unwrap_or(Path::new(".")).join(base);
    let mut merged = read_job_table(&base_path, depth + 1)?;
    merge_tables(&mut merged, table);
    Ok(merged)
}

fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}
