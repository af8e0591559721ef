//! The job file as written (TOML, [`JobFile`]) and the resolved job a run executes ([`Job`]).
//!
//! Relative paths inside a job file are relative to the job file's directory, so a job runs the
//! same from any working directory. Secrets never live here: a model names the environment
//! variable that holds its API key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::job_err;
use crate::text::CandidateMode;

/// What to do with a malformed input line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadLinePolicy {
    /// Stop the run with an error naming file and line.
    #[default]
    Error,
    /// Skip the line and count it as a drop of the `candidates` stage.
    Skip,
}

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
    pub quality: crate::quality::QualityRules,
    /// MinHash signatures for near-dedup (`[prepare.near_dedup]`; the `deduped` stage uses
    /// them); absent means no signatures.
    pub near_dedup: Option<crate::minhash::NearDedup>,
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
    /// Attempts per request before the row gets an error value.
    pub max_attempts: Option<u32>,
    /// Extra JSON fields merged into each request body (e.g. vLLM's `repetition_penalty`).
    pub extra: Option<toml::Table>,
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
    /// `score_pair` only: `text` (default: reasoning, then `Score: N`) or `logprobs` (one
    /// token with its most likely alternatives; the expected score over the digits 1-5, and
    /// the text judgement when no digit is among them).
    pub mode: Option<String>,
}

/// `[[stages]]`: one stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Stage and output table name.
    pub name: String,
    /// Path of the stage's SQL; built-in stages have a default.
    pub sql: Option<String>,
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
}

/// The built-in stages: name, the table it reads by default, SQL. The first six are the
/// paper's pipeline in order; the rest are used by the Humpback and Kun jobs.
pub const BUILTIN_STAGES: &[(&str, &str, &str)] = &[
    (
        "candidates",
        "documents",
        include_str!("../sql/candidates.sql"),
    ),
    (
        "backtranslated",
        "candidates",
        include_str!("../sql/backtranslated.sql"),
    ),
    (
        "scored",
        "backtranslated",
        include_str!("../sql/scored.sql"),
    ),
    ("curated", "scored", include_str!("../sql/curated.sql")),
    ("rewritten", "curated", include_str!("../sql/rewritten.sql")),
    ("distilled", "curated", include_str!("../sql/distilled.sql")),
    ("rescored", "scored", include_str!("../sql/rescored.sql")),
    (
        "judged",
        "backtranslated",
        include_str!("../sql/judged.sql"),
    ),
    ("polished", "judged", include_str!("../sql/polished.sql")),
    ("filtered", "rewritten", include_str!("../sql/filtered.sql")),
    ("deduped", "candidates", include_str!("../sql/deduped.sql")),
];

/// Verb-style names users type for built-in stages (`--stages prepare`).
const STAGE_ALIASES: &[(&str, &str)] = &[
    ("prepare", "candidates"),
    ("backtranslate", "backtranslated"),
    ("score", "scored"),
    ("curate", "curated"),
    ("rewrite", "rewritten"),
    ("distill", "distilled"),
];

/// A built-in LLM function.
pub struct BuiltinFunction {
    /// SQL name.
    pub name: &'static str,
    /// Argument names, which are also the template's variables.
    pub args: &'static [&'static str],
    /// Model role called unless the job says otherwise.
    pub role: &'static str,
    /// Prompt template.
    pub template: &'static str,
}

/// The built-in LLM functions. `rescore` is `score_pair` for Humpback's second iteration,
/// asking a second model (`scorer_m1`); `judge_instruction` and `polish` are Kun's steps.
pub const BUILTIN_FUNCTIONS: &[BuiltinFunction] = &[
    BuiltinFunction {
        name: "backtranslate",
        args: &["text"],
        role: "backward",
        template: include_str!("prompts/backtranslate.txt"),
    },
    BuiltinFunction {
        name: "score_pair",
        args: &["instruction", "response"],
        role: "scorer",
        template: include_str!("prompts/score_pair.txt"),
    },
    BuiltinFunction {
        name: "rescore",
        args: &["instruction", "response"],
        role: "scorer_m1",
        template: include_str!("prompts/score_pair.txt"),
    },
    BuiltinFunction {
        name: "rewrite",
        args: &["instruction", "draft"],
        role: "rewriter",
        template: include_str!("prompts/rewrite.txt"),
    },
    BuiltinFunction {
        name: "answer",
        args: &["instruction"],
        role: "rewriter",
        template: include_str!("prompts/answer.txt"),
    },
    BuiltinFunction {
        name: "judge_instruction",
        args: &["instruction"],
        role: "scorer",
        template: include_str!("prompts/judge_instruction.txt"),
    },
    BuiltinFunction {
        name: "polish",
        args: &["instruction", "draft"],
        role: "rewriter",
        template: include_str!("prompts/polish.txt"),
    },
];

/// Functions that score pairs on the 5-point rubric and so accept `mode = "logprobs"`.
const SCORING_FUNCTIONS: &[&str] = &["score_pair", "rescore"];

/// A resolved model role.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelSpec {
    /// Role name.
    pub role: String,
    /// Base URLs (one or more replicas), or `mock`.
    pub endpoints: Vec<String>,
    /// Model name.
    pub model: String,
    /// Chat or completions.
    pub api: Api,
    /// Name of the environment variable with the API key (the key itself is never stored).
    pub api_key_env: String,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Maximum generated tokens.
    pub max_tokens: u32,
    /// Cap on requests in flight to the endpoint.
    pub concurrency: usize,
    /// Per-request timeout in seconds.
    pub timeout_secs: u64,
    /// Attempts per request.
    pub max_attempts: u32,
    /// Extra request-body fields.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Requests per minute.
    pub requests_per_minute: Option<f64>,
    /// Prompt tokens per minute.
    pub input_tokens_per_minute: Option<f64>,
    /// Completion tokens per minute.
    pub output_tokens_per_minute: Option<f64>,
    /// Dollars per million prompt tokens.
    pub price_input_per_mtok: f64,
    /// Dollars per million completion tokens.
    pub price_output_per_mtok: f64,
    /// Whether the job (or `--endpoint`) set this role. A job without `[models]` runs every
    /// role on the offline mock; one with `[models]` must name every role its stages call,
    /// so no stage reaches the mock by accident.
    pub declared: bool,
}

impl ModelSpec {
    /// What a call with these token counts costs at the model's prices.
    pub fn cost_usd(&self, prompt: Option<i64>, completion: Option<i64>) -> f64 {
        (prompt.unwrap_or(0).max(0) as f64 * self.price_input_per_mtok
            + completion.unwrap_or(0).max(0) as f64 * self.price_output_per_mtok)
            / 1e6
    }
}

/// A resolved LLM function.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FunctionSpec {
    /// SQL name of the function.
    pub name: String,
    /// Argument names, which are also the template's variables.
    pub args: Vec<String>,
    /// The built-in function it is or copies (`like`); `None` for a function written out.
    pub builtin: Option<String>,
    /// The model role it calls.
    pub role: String,
    /// Prompt template text (minijinja).
    pub template: String,
    /// Optional system message.
    pub system: Option<String>,
    /// Maximum generated tokens.
    pub max_tokens: u32,
    /// Ask for the first token's 20 most likely alternatives (logprob scoring).
    pub logprobs: bool,
    /// The text-mode template and output length, asked when a logprob reply names no digit.
    pub fallback: Option<(String, u32)>,
}

/// A resolved stage.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageSpec {
    /// Stage and table name.
    pub name: String,
    /// The SQL template text.
    pub sql: String,
    /// The table it reads, for `{{ stage.from }}`.
    pub from: Option<String>,
    /// Values for `{{ stage.NAME }}`.
    pub vars: toml::Table,
}

/// Resolved candidate preparation settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrepareSpec {
    /// Document or segments.
    pub mode: CandidateMode,
    /// Minimum characters.
    pub min_chars: usize,
    /// Maximum characters (0: none).
    pub max_chars: usize,
    /// Maximum tokens.
    pub max_tokens: usize,
    /// Tokenizer spec.
    pub tokenizer: String,
    /// Sentence-repeat similarity threshold.
    pub repeat_jaccard: f64,
    /// Quality rules.
    pub quality: crate::quality::QualityRules,
    /// Near-dedup settings, when signatures are computed.
    pub near_dedup: Option<crate::minhash::NearDedup>,
}

/// A job ready to run: defaults applied, overrides applied, templates loaded.
#[derive(Debug, Clone)]
pub struct Job {
    /// Job name.
    pub name: String,
    /// Directory relative paths of the job file were resolved against.
    pub base_dir: PathBuf,
    /// Input locations (paths or URLs).
    pub inputs: Vec<String>,
    /// Malformed-line policy.
    pub on_bad_line: BadLinePolicy,
    /// Output root (path or URL).
    pub output: String,
    /// Candidate preparation.
    pub prepare: PrepareSpec,
    /// Curation threshold.
    pub threshold: i64,
    /// Scoring iteration curation reads (0: `scored`, 1: `rescored`).
    pub curate_iteration: u32,
    /// Model roles by name.
    pub models: BTreeMap<String, ModelSpec>,
    /// LLM functions.
    pub functions: Vec<FunctionSpec>,
    /// Stages in order.
    pub stages: Vec<StageSpec>,
    /// Free-form SQL parameters.
    pub params: toml::Table,
    /// Engine settings.
    pub execution: ExecutionConfig,
}

impl Job {
    /// Reads and resolves the job file at `path`, applying `overrides`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self> {
        let table = read_job_table(path, 0)?;
        let file: JobFile = table
            .try_into()
            .map_err(|e| Error::Job(format!("{}: {e}", path.display())))?;
        let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let default_name = path
            .file_stem()
            .map_or("job".to_string(), |s| s.to_string_lossy().into_owned());
        Self::resolve(file, base_dir, default_name, overrides)
    }

    /// Resolves a parsed job file; relative paths are taken against `base_dir`.
    pub fn resolve(
        file: JobFile,
        base_dir: PathBuf,
        default_name: String,
        overrides: &Overrides,
    ) -> Result<Self> {
        let rel = |p: &str| resolve_path(&base_dir, p);
        let inputs = if overrides.inputs.is_empty() {
            file.input.paths.iter().map(|p| rel(p)).collect()
        } else {
            overrides.inputs.clone()
        };
        if inputs.is_empty() {
            return job_err!("no input: set [input] paths in the job or pass --input");
        }
        let output = overrides
            .output
            .clone()
            .unwrap_or_else(|| rel(&file.output));
        let prepare = resolve_prepare(&file.prepare);
        let models = resolve_models(&file.models, overrides)?;
        let functions = resolve_functions(&file.functions, &models, &base_dir)?;
        let stages = resolve_stages(file.stages.as_deref(), &base_dir)?;
        if !(1..=5).contains(&file.curate.threshold) {
            return job_err!(
                "[curate] threshold = {} is outside the 1-5 score scale",
                file.curate.threshold
            );
        }
        if let Some(near) = &prepare.near_dedup {
            near.check()?;
        }
        if file.curate.iteration > 1 {
            return job_err!(
                "[curate] iteration = {}: there are two scoring iterations, 0 (scored) and 1 (rescored)",
                file.curate.iteration
            );
        }
        Ok(Self {
            name: file.name.unwrap_or(default_name),
            base_dir,
            inputs,
            on_bad_line: file.input.on_bad_line,
            output,
            prepare,
            threshold: file.curate.threshold,
            curate_iteration: file.curate.iteration,
            models,
            functions,
            stages,
            params: file.params,
            execution: file.execution,
        })
    }

    /// What a dataset card records of the job: the settings that shape the data, without
    /// endpoints (which may carry credentials) or key variable names.
    pub fn settings(&self) -> serde_json::Value {
        let models: BTreeMap<&str, serde_json::Value> = self
            .models
            .iter()
            .filter(|(_, m)| m.declared)
            .map(|(role, m)| {
                (
                    role.as_str(),
                    serde_json::json!({
                        "model": m.model, "api": m.api, "temperature": m.temperature,
                        "top_p": m.top_p, "max_tokens": m.max_tokens, "extra": m.extra,
                    }),
                )
            })
            .collect();
        let stages: Vec<serde_json::Value> = self
            .stages
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "from": s.from, "vars": s.vars}))
            .collect();
        let functions: Vec<serde_json::Value> = self
            .functions
            .iter()
            .filter(|f| self.stages.iter().any(|s| calls(&s.sql, &f.name)))
            .map(|f| serde_json::json!({"name": f.name, "model": f.role, "max_tokens": f.max_tokens, "logprobs": f.logprobs}))
            .collect();
        let mut prepare = serde_json::json!(self.prepare);
        if !matches!(
            self.prepare.tokenizer.as_str(),
            "cl100k_base" | "o200k_base"
        ) {
            // A tokenizer.json path, made absolute so `stats` finds it from anywhere.
            prepare["tokenizer"] = resolve_path(&self.base_dir, &self.prepare.tokenizer).into();
        }
        serde_json::json!({
            "name": self.name,
            "prepare": prepare,
            "curate": {"threshold": self.threshold, "iteration": self.curate_iteration},
            "models": models,
            "functions": functions,
            "stages": stages,
            "params": self.params,
        })
    }

    /// The LLM functions `sql` calls.
    pub fn functions_in<'a>(&'a self, sql: &'a str) -> impl Iterator<Item = &'a FunctionSpec> + 'a {
        self.functions.iter().filter(move |f| calls(sql, &f.name))
    }

    /// The stage names to run for `--stages a,b` (aliases accepted), in job order.
    pub fn select_stages(&self, requested: &[String]) -> Result<Vec<String>> {
        if requested.is_empty() {
            return Ok(self.stages.iter().map(|s| s.name.clone()).collect());
        }
        let mut wanted = Vec::new();
        for name in requested {
            let name = canonical_stage_name(name);
            if !self.stages.iter().any(|s| s.name == name) {
                let known: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
                return job_err!(
                    "--stages names '{name}', which this job does not have (stages: {})",
                    known.join(", ")
                );
            }
            wanted.push(name.to_string());
        }
        Ok(self
            .stages
            .iter()
            .filter(|s| wanted.contains(&s.name))
            .map(|s| s.name.clone())
            .collect())
    }
}

/// Whether `sql` calls the function `name`.
fn calls(sql: &str, name: &str) -> bool {
    sql.contains(&format!("{name}("))
}

/// Reads a job file as a TOML table, with the file it `extends` (a path relative to it)
/// underneath: tables merge key by key, anything else (arrays such as `stages` included) is
/// replaced by the extending file's value.
fn read_job_table(path: &Path, depth: usize) -> Result<toml::Table> {
    if depth > 8 {
        return job_err!(
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
        return job_err!(
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

/// Maps a verb alias (`prepare`) to its stage name (`candidates`); other names pass through.
pub fn canonical_stage_name(name: &str) -> &str {
    STAGE_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, stage)| stage)
}

/// Resolves `p` against `base` unless it is absolute or a URL, folding `..` where it can.
pub fn resolve_path(base: &Path, p: &str) -> String {
    if p.contains("://") || Path::new(p).is_absolute() {
        return p.to_string();
    }
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in base.join(p).components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out.to_string_lossy().into_owned()
}

fn resolve_prepare(cfg: &PrepareConfig) -> PrepareSpec {
    let mode = cfg.mode.unwrap_or(CandidateMode::Document);
    let (min_chars, max_chars) = match mode {
        CandidateMode::Document => (1, 0),
        CandidateMode::Segments => (600, 3000),
    };
    PrepareSpec {
        mode,
        min_chars: cfg.min_chars.unwrap_or(min_chars),
        max_chars: cfg.max_chars.unwrap_or(max_chars),
        max_tokens: cfg.max_tokens.unwrap_or(3500),
        tokenizer: cfg
            .tokenizer
            .clone()
            .unwrap_or_else(|| "cl100k_base".to_string()),
        repeat_jaccard: cfg.repeat_jaccard.unwrap_or(0.7),
        quality: cfg.quality.clone(),
        near_dedup: cfg.near_dedup,
    }
}

/// Default output length per role: instructions are short, judgements carry reasoning,
/// rewrites are as long as the documents they rewrite.
fn default_max_tokens(role: &str) -> u32 {
    match role {
        "backward" => 256,
        "scorer" => 512,
        _ => 2048,
    }
}

fn resolve_models(
    cfgs: &BTreeMap<String, ModelConfig>,
    overrides: &Overrides,
) -> Result<BTreeMap<String, ModelSpec>> {
    let mut roles: Vec<String> = cfgs.keys().cloned().collect();
    for f in BUILTIN_FUNCTIONS {
        if !roles.iter().any(|r| r == f.role) {
            roles.push(f.role.to_string());
        }
    }
    let mut out = BTreeMap::new();
    for role in roles {
        let cfg = cfgs.get(&role);
        let endpoints: Vec<String> = match (&overrides.endpoint, cfg) {
            (Some(list), _) => list.split(',').map(str::to_string).collect(),
            (None, Some(c)) => match (&c.endpoint, &c.endpoints) {
                (Some(_), Some(_)) => {
                    return job_err!("[models.{role}] sets both endpoint and endpoints; keep one");
                }
                (Some(one), None) => vec![one.clone()],
                (None, Some(many)) if !many.is_empty() => many.clone(),
                _ => return job_err!("[models.{role}] needs an endpoint (a URL, or \"mock\")"),
            },
            (None, None) => vec!["mock".to_string()],
        };
        let model = overrides
            .model
            .clone()
            .or_else(|| cfg.map(|c| c.model.clone()))
            .unwrap_or_else(|| role.clone());
        for endpoint in &endpoints {
            let url = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            if !(url || (endpoint == "mock" && endpoints.len() == 1)) {
                return job_err!(
                    "[models.{role}] endpoint '{endpoint}' is neither an http(s) URL nor 'mock' (alone)"
                );
            }
        }
        let spec = ModelSpec {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim().trim_end_matches('/').to_string())
                .collect(),
            model,
            api: cfg.map(|c| c.api).unwrap_or_default(),
            api_key_env: cfg
                .and_then(|c| c.api_key_env.clone())
                .unwrap_or_else(|| "OPENAI_API_KEY".to_string()),
            temperature: cfg.and_then(|c| c.temperature).unwrap_or(1.0),
            top_p: cfg.and_then(|c| c.top_p).unwrap_or(0.9),
            max_tokens: cfg
                .and_then(|c| c.max_tokens)
                .unwrap_or_else(|| default_max_tokens(&role)),
            concurrency: overrides
                .concurrency
                .or_else(|| cfg.and_then(|c| c.concurrency))
                .unwrap_or(64),
            timeout_secs: cfg.and_then(|c| c.timeout_secs).unwrap_or(600),
            max_attempts: cfg.and_then(|c| c.max_attempts).unwrap_or(5).max(1),
            extra: match cfg.and_then(|c| c.extra.clone()) {
                Some(table) => match serde_json::to_value(table) {
                    Ok(serde_json::Value::Object(map)) => map,
                    _ => return job_err!("[models.{role}] extra must be a table"),
                },
                None => serde_json::Map::new(),
            },
            requests_per_minute: cfg.and_then(|c| c.requests_per_minute),
            input_tokens_per_minute: cfg.and_then(|c| c.input_tokens_per_minute),
            output_tokens_per_minute: cfg.and_then(|c| c.output_tokens_per_minute),
            price_input_per_mtok: cfg.and_then(|c| c.price_input_per_mtok).unwrap_or(0.0),
            price_output_per_mtok: cfg.and_then(|c| c.price_output_per_mtok).unwrap_or(0.0),
            declared: cfg.is_some() || overrides.endpoint.is_some() || cfgs.is_empty(),
            role: role.clone(),
        };
        if spec.concurrency == 0 {
            return job_err!("[models.{role}] concurrency must be at least 1");
        }
        out.insert(role, spec);
    }
    Ok(out)
}

fn resolve_functions(
    cfgs: &BTreeMap<String, FunctionConfig>,
    models: &BTreeMap<String, ModelSpec>,
    base_dir: &Path,
) -> Result<Vec<FunctionSpec>> {
    let mut names: Vec<&str> = BUILTIN_FUNCTIONS.iter().map(|f| f.name).collect();
    for name in cfgs.keys() {
        if builtin_function(name).is_none() {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let cfg = cfgs.get(name).cloned().unwrap_or_default();
            resolve_function(name, cfg, models, base_dir)
        })
        .collect()
}

fn builtin_function(name: &str) -> Option<&'static BuiltinFunction> {
    BUILTIN_FUNCTIONS.iter().find(|f| f.name == name)
}

fn resolve_function(
    name: &str,
    cfg: FunctionConfig,
    models: &BTreeMap<String, ModelSpec>,
    base_dir: &Path,
) -> Result<FunctionSpec> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return job_err!(
            "[functions.{name}]: a function name is lower-case letters, digits and '_'"
        );
    }
    let base = match (&cfg.like, builtin_function(name)) {
        (Some(like), None) => match builtin_function(like) {
            Some(b) => Some(b),
            None => {
                let known: Vec<&str> = BUILTIN_FUNCTIONS.iter().map(|f| f.name).collect();
                return job_err!(
                    "[functions.{name}] like = \"{like}\" is not a built-in function ({})",
                    known.join(", ")
                );
            }
        },
        (Some(_), Some(_)) => {
            return job_err!("[functions.{name}] is built in, so it cannot be `like` another");
        }
        (None, builtin) => builtin,
    };
    let args: Vec<String> = match (&cfg.args, base) {
        (Some(args), None) if !args.is_empty() => args.clone(),
        (None, Some(b)) => b.args.iter().map(|a| a.to_string()).collect(),
        (Some(_), Some(_)) => {
            return job_err!("[functions.{name}] takes the arguments of its built-in; drop `args`");
        }
        _ => {
            return job_err!(
                "[functions.{name}] is not built in: give `like = \"<built-in>\"`, or `args`, `template` and `model`"
            );
        }
    };
    let Some(role) = cfg
        .model
        .clone()
        .or_else(|| base.map(|b| b.role.to_string()))
    else {
        return job_err!("[functions.{name}] needs `model` (a role of [models])");
    };
    let Some(model) = models.get(&role) else {
        return job_err!(
            "[functions.{name}] uses model role '{role}', which [models] does not define"
        );
    };
    let scoring = SCORING_FUNCTIONS.contains(&name)
        || base.is_some_and(|b| SCORING_FUNCTIONS.contains(&b.name));
    let logprobs = match cfg.mode.as_deref() {
        None | Some("text") => false,
        Some("logprobs") if scoring => true,
        Some(other) => {
            return job_err!(
                "[functions.{name}] mode = \"{other}\": only scoring functions have modes (text, logprobs)"
            );
        }
    };
    let text_template = base.map(|b| b.template);
    let default_template = if logprobs {
        Some(include_str!("prompts/score_pair_logprobs.txt"))
    } else {
        text_template
    };
    let template = match (cfg.template, default_template) {
        (Some(path), _) => {
            let path = base_dir.join(path);
            std::fs::read_to_string(&path).map_err(|e| {
                Error::Job(format!(
                    "[functions.{name}] template {}: {e}",
                    path.display()
                ))
            })?
        }
        (None, Some(builtin)) => builtin.to_string(),
        (None, None) => return job_err!("[functions.{name}] needs `template` (a path)"),
    };
    let text_max_tokens = cfg.max_tokens.unwrap_or(model.max_tokens);
    Ok(FunctionSpec {
        name: name.to_string(),
        args,
        builtin: base.map(|b| b.name.to_string()),
        role,
        template,
        system: cfg.system,
        max_tokens: if logprobs { 1 } else { text_max_tokens },
        logprobs,
        fallback: logprobs.then(|| {
            (
                text_template
                    .unwrap_or(include_str!("prompts/score_pair.txt"))
                    .to_string(),
                text_max_tokens,
            )
        }),
    })
}

fn resolve_stages(cfgs: Option<&[StageConfig]>, base_dir: &Path) -> Result<Vec<StageSpec>> {
    let default: Vec<StageConfig> = BUILTIN_STAGES[..5]
        .iter()
        .map(|(name, _, _)| StageConfig {
            name: name.to_string(),
            sql: None,
            from: None,
            vars: toml::Table::new(),
        })
        .collect();
    let cfgs = cfgs.unwrap_or(&default);
    let mut out: Vec<StageSpec> = Vec::new();
    for cfg in cfgs {
        let valid = !cfg.name.is_empty()
            && cfg
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid || cfg.name == "documents" {
            return job_err!(
                "stage name '{}' must be lower-case letters, digits and '_', and not 'documents'",
                cfg.name
            );
        }
        if out.iter().any(|s| s.name == cfg.name) {
            return job_err!("stage '{}' appears twice", cfg.name);
        }
        let builtin = BUILTIN_STAGES.iter().find(|(n, _, _)| *n == cfg.name);
        let sql = match &cfg.sql {
            Some(path) => {
                let path = base_dir.join(path);
                std::fs::read_to_string(&path).map_err(|e| {
                    Error::Job(format!("stage '{}' sql {}: {e}", cfg.name, path.display()))
                })?
            }
            None => match builtin {
                Some((_, _, sql)) => sql.to_string(),
                None => {
                    return job_err!(
                        "stage '{}' is not built in, so it needs `sql = \"path/to.sql\"`",
                        cfg.name
                    );
                }
            },
        };
        out.push(StageSpec {
            name: cfg.name.clone(),
            sql,
            from: cfg
                .from
                .clone()
                .or_else(|| builtin.map(|(_, from, _)| from.to_string())),
            vars: cfg.vars.clone(),
        });
    }
    Ok(out)
}
