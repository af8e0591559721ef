//! The job file as written (TOML, [`JobFile`]) and the resolved job a run executes ([`Job`]).
//!
//! Relative paths inside a job file are relative to the job file's directory, so a job runs the
//! same from any working directory. Secrets never live here: a model names the environment
//! variable that holds its API key.

pub mod catalog;
pub mod file;
pub mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::escape::redact_url;
use crate::job::catalog::{
    BuiltinFunction, Catalog, DOCUMENTS, ExpectedOutput, MockAnswer, SCORE_LOGPROBS_TEMPLATE,
    SCORE_TEMPLATE,
};
use crate::job::file::{
    ExecutionConfig, FunctionConfig, JobFile, ModelConfig, PrepareConfig, StageConfig,
    read_job_table,
};
use crate::job::template::{called_functions, render_sql};
use crate::job_error;
use crate::prepare::ingest::{MAX_LINE_BYTES, MAX_ROW_GROUP_BYTES, ReadRules};
use crate::prepare::segment::CandidateMode;

pub use crate::job::file::{Api, Overrides};

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
    /// Whether the job named `api_key_env` for this role (rather than the default).
    pub api_key_named: bool,
    /// Whether the key may go over plain HTTP to a host that is not this machine.
    pub key_over_http: bool,
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
    /// Attempts per request that failed (not counting throttled ones).
    pub max_attempts: u32,
    /// Seconds a request may keep being throttled, from its first 429.
    pub throttle_secs: u64,
    /// Longest reply body read, in bytes.
    pub max_reply_bytes: usize,
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
    /// Whether this role's API key may be sent to `endpoint`. The default variable
    /// (`OPENAI_API_KEY`) goes only to OpenAI; a variable the job names goes to the role's own
    /// endpoints. Never over plain HTTP, except to this machine or when the job says
    /// `key_over_http = true`.
    pub fn sends_key_to(&self, endpoint: &str) -> bool {
        let Ok(url) = url::Url::parse(endpoint) else {
            return false;
        };
        let host = url.host_str().unwrap_or_default();
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let plain = url.scheme() != "https";
        if plain && !loopback && !self.key_over_http {
            return false;
        }
        self.api_key_named || host == "api.openai.com"
    }

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
    /// Output tokens `estimate` expects per call (the built-in's; `None` for a function
    /// written out in the job).
    #[serde(skip)]
    pub expected_output: Option<ExpectedOutput>,
    /// How the offline mock answers it.
    #[serde(skip)]
    pub mock: MockAnswer,
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
    /// Verbs `--stages` accepts for it (a built-in's).
    #[serde(skip)]
    pub aliases: Vec<String>,
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
    pub quality: crate::prepare::quality::QualityRules,
    /// Near-dedup settings, when signatures are computed.
    pub near_dedup: Option<crate::prepare::minhash::NearDedup>,
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
    /// How input lines are read.
    pub read_rules: ReadRules,
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
        Self::resolve_in(Catalog::builtin(), file, base_dir, default_name, overrides)
    }

    /// Resolves a parsed job file against `catalog`: the stages and functions it may use by
    /// name alone.
    pub fn resolve_in(
        catalog: &Catalog,
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
            return job_error!("no input: set [input] paths in the job or pass --input");
        }
        let output = overrides
            .output
            .clone()
            .unwrap_or_else(|| rel(&file.output));
        let prepare = resolve_prepare(&file.prepare);
        let models = resolve_models(catalog, &file.models, overrides)?;
        let functions = resolve_functions(catalog, &file.functions, &models, &base_dir)?;
        let stages = resolve_stages(catalog, file.stages.as_deref(), &base_dir)?;
        if !(1..=5).contains(&file.curate.threshold) {
            return job_error!(
                "[curate] threshold = {} is outside the 1-5 score scale",
                file.curate.threshold
            );
        }
        if let Some(near) = &prepare.near_dedup {
            near.check()?;
        }
        check_budget(file.execution.budget_usd, &models)?;
        if file.curate.iteration > 1 {
            return job_error!(
                "[curate] iteration = {}: there are two scoring iterations, 0 (scored) and 1 (rescored)",
                file.curate.iteration
            );
        }
        Ok(Self {
            name: file.name.unwrap_or(default_name),
            base_dir,
            inputs,
            read_rules: ReadRules {
                on_bad_line: file.input.on_bad_line,
                max_line_bytes: file.input.max_line_bytes.unwrap_or(MAX_LINE_BYTES).max(1),
                max_row_group_bytes: file
                    .input
                    .max_row_group_bytes
                    .unwrap_or(MAX_ROW_GROUP_BYTES),
            },
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
        let called: std::collections::BTreeSet<String> = self
            .stages
            .iter()
            .filter_map(|s| render_sql(self, s).ok())
            .flat_map(|sql| called_functions(&sql))
            .collect();
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
            .filter(|f| called.contains(&f.name))
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
    pub fn functions_in(&self, sql: &str) -> Vec<&FunctionSpec> {
        let called = called_functions(sql);
        self.functions
            .iter()
            .filter(|f| called.contains(&f.name))
            .collect()
    }

    /// The name of the stage `name` stands for: a stage's own name, or one of its verbs
    /// (`prepare` for `candidates`). Other names pass through.
    pub fn canonical_stage_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.stages
            .iter()
            .find(|s| s.aliases.iter().any(|a| a == name))
            .map_or(name, |s| s.name.as_str())
    }

    /// The stage names to run for `--stages a,b` (aliases accepted), in job order.
    pub fn select_stages(&self, requested: &[String]) -> Result<Vec<String>> {
        if requested.is_empty() {
            return Ok(self.stages.iter().map(|s| s.name.clone()).collect());
        }
        let mut wanted = Vec::new();
        for name in requested {
            let name = self.canonical_stage_name(name);
            if !self.stages.iter().any(|s| s.name == name) {
                let known: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
                return job_error!(
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

/// Numbers a model role's requests depend on, checked where they are given rather than
/// where they would make the run misbehave (a rate of 0 or NaN, a cap no semaphore holds).
fn check_model(spec: &ModelSpec) -> Result<()> {
    let role = &spec.role;
    if !(1..=MAX_CONCURRENCY).contains(&spec.concurrency) {
        return job_error!(
            "[models.{role}] concurrency = {}: give 1 to {MAX_CONCURRENCY} requests in flight (or --concurrency)",
            spec.concurrency
        );
    }
    for (name, secs, most) in [
        ("timeout_secs", spec.timeout_secs, 7 * 86_400),
        ("throttle_secs", spec.throttle_secs, 30 * 86_400),
    ] {
        if secs > most {
            return job_error!("[models.{role}] {name} = {secs}: give at most {most} seconds");
        }
    }
    for (name, rate) in [
        ("requests_per_minute", spec.requests_per_minute),
        ("input_tokens_per_minute", spec.input_tokens_per_minute),
        ("output_tokens_per_minute", spec.output_tokens_per_minute),
    ] {
        if let Some(rate) = rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return job_error!(
                "[models.{role}] {name} = {rate}: give a positive number, or leave it out for no limit"
            );
        }
    }
    for (name, value) in [
        ("price_input_per_mtok", spec.price_input_per_mtok),
        ("price_output_per_mtok", spec.price_output_per_mtok),
        ("temperature", spec.temperature),
        ("top_p", spec.top_p),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return job_error!("[models.{role}] {name} = {value}: give a number of at least 0");
        }
    }
    Ok(())
}

/// The most requests in flight one endpoint may be given.
pub const MAX_CONCURRENCY: usize = 100_000;

/// A budget needs a positive amount and prices to count against it.
fn check_budget(budget: Option<f64>, models: &BTreeMap<String, ModelSpec>) -> Result<()> {
    let Some(budget) = budget else {
        return Ok(());
    };
    if !(budget > 0.0 && budget.is_finite()) {
        return job_error!("[execution] budget_usd = {budget}: it must be a positive amount");
    }
    let priced = models
        .values()
        .any(|m| m.price_input_per_mtok > 0.0 || m.price_output_per_mtok > 0.0);
    if !priced {
        return job_error!(
            "[execution] budget_usd is set, but no model has prices, so nothing would count against it: \
             set price_input_per_mtok and price_output_per_mtok in [models.ROLE]"
        );
    }
    Ok(())
}

fn resolve_models(
    catalog: &Catalog,
    cfgs: &BTreeMap<String, ModelConfig>,
    overrides: &Overrides,
) -> Result<BTreeMap<String, ModelSpec>> {
    let mut roles: Vec<String> = cfgs.keys().cloned().collect();
    for f in &catalog.functions {
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
                    return job_error!(
                        "[models.{role}] sets both endpoint and endpoints; keep one"
                    );
                }
                (Some(one), None) => vec![one.clone()],
                (None, Some(many)) if !many.is_empty() => many.clone(),
                _ => return job_error!("[models.{role}] needs an endpoint (a URL, or \"mock\")"),
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
                return job_error!(
                    "[models.{role}] endpoint '{}' is neither an http(s) URL nor 'mock' (alone)",
                    redact_url(endpoint)
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
            api_key_named: cfg.is_some_and(|c| c.api_key_env.is_some()),
            key_over_http: cfg.is_some_and(|c| c.key_over_http),
            api_key_env: cfg
                .and_then(|c| c.api_key_env.clone())
                .unwrap_or_else(|| "OPENAI_API_KEY".to_string()),
            temperature: cfg.and_then(|c| c.temperature).unwrap_or(1.0),
            top_p: cfg.and_then(|c| c.top_p).unwrap_or(0.9),
            max_tokens: cfg
                .and_then(|c| c.max_tokens)
                .unwrap_or_else(|| catalog.default_max_tokens(&role)),
            concurrency: overrides
                .concurrency
                .or_else(|| cfg.and_then(|c| c.concurrency))
                .unwrap_or(64),
            timeout_secs: cfg.and_then(|c| c.timeout_secs).unwrap_or(600),
            max_attempts: cfg.and_then(|c| c.max_attempts).unwrap_or(5).max(1),
            throttle_secs: cfg.and_then(|c| c.throttle_secs).unwrap_or(1800),
            max_reply_bytes: 0,
            extra: match cfg.and_then(|c| c.extra.clone()) {
                Some(table) => match serde_json::to_value(table) {
                    Ok(serde_json::Value::Object(map)) => map,
                    _ => return job_error!("[models.{role}] extra must be a table"),
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
        let mut spec = spec;
        spec.max_reply_bytes = cfg
            .and_then(|c| c.max_reply_bytes)
            .unwrap_or((1 << 20) + 256 * spec.max_tokens as usize);
        check_model(&spec)?;
        out.insert(role, spec);
    }
    Ok(out)
}

fn resolve_functions(
    catalog: &Catalog,
    cfgs: &BTreeMap<String, FunctionConfig>,
    models: &BTreeMap<String, ModelSpec>,
    base_dir: &Path,
) -> Result<Vec<FunctionSpec>> {
    let mut names: Vec<&str> = catalog.functions.iter().map(|f| f.name).collect();
    for name in cfgs.keys() {
        if catalog.function(name).is_none() {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let cfg = cfgs.get(name).cloned().unwrap_or_default();
            resolve_function(catalog, name, cfg, models, base_dir)
        })
        .collect()
}

/// The built-in function `name` is, or copies with `like`; `None` for one written out.
fn builtin_base<'c>(
    catalog: &'c Catalog,
    name: &str,
    cfg: &FunctionConfig,
) -> Result<Option<&'c BuiltinFunction>> {
    match (&cfg.like, catalog.function(name)) {
        (Some(like), None) => match catalog.function(like) {
            Some(b) => Ok(Some(b)),
            None => {
                let known: Vec<&str> = catalog.functions.iter().map(|f| f.name).collect();
                job_error!(
                    "[functions.{name}] like = \"{like}\" is not a built-in function ({})",
                    known.join(", ")
                )
            }
        },
        (Some(_), Some(_)) => {
            job_error!("[functions.{name}] is built in, so it cannot be `like` another")
        }
        (None, builtin) => Ok(builtin),
    }
}

fn resolve_function(
    catalog: &Catalog,
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
        return job_error!(
            "[functions.{name}]: a function name is lower-case letters, digits and '_'"
        );
    }
    let base = builtin_base(catalog, name, &cfg)?;
    let args: Vec<String> = match (&cfg.args, base) {
        (Some(args), None) if !args.is_empty() => args.clone(),
        (None, Some(b)) => b.args.iter().map(|a| a.to_string()).collect(),
        (Some(_), Some(_)) => {
            return job_error!(
                "[functions.{name}] takes the arguments of its built-in; drop `args`"
            );
        }
        _ => {
            return job_error!(
                "[functions.{name}] is not built in: give `like = \"<built-in>\"`, or `args`, `template` and `model`"
            );
        }
    };
    let Some(role) = cfg
        .model
        .clone()
        .or_else(|| base.map(|b| b.role.to_string()))
    else {
        return job_error!("[functions.{name}] needs `model` (a role of [models])");
    };
    let Some(model) = models.get(&role) else {
        return job_error!(
            "[functions.{name}] uses model role '{role}', which [models] does not define"
        );
    };
    let scoring = base.is_some_and(|b| b.scores);
    let logprobs = match cfg.mode.as_deref() {
        None | Some("text") => false,
        Some("logprobs") if scoring => true,
        Some(other) => {
            return job_error!(
                "[functions.{name}] mode = \"{other}\": only scoring functions have modes (text, logprobs)"
            );
        }
    };
    let text_template = base.map(|b| b.template);
    let default_template = if logprobs {
        Some(SCORE_LOGPROBS_TEMPLATE)
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
        (None, None) => return job_error!("[functions.{name}] needs `template` (a path)"),
    };
    let text_max_tokens = cfg.max_tokens.unwrap_or(model.max_tokens);
    Ok(FunctionSpec {
        name: name.to_string(),
        args,
        builtin: base.map(|b| b.name.to_string()),
        expected_output: base.map(|b| b.expected_output),
        mock: base.map(|b| b.mock).unwrap_or_default(),
        role,
        template,
        system: cfg.system,
        max_tokens: if logprobs { 1 } else { text_max_tokens },
        logprobs,
        fallback: logprobs.then(|| {
            (
                text_template.unwrap_or(SCORE_TEMPLATE).to_string(),
                text_max_tokens,
            )
        }),
    })
}

fn resolve_stages(
    catalog: &Catalog,
    cfgs: Option<&[StageConfig]>,
    base_dir: &Path,
) -> Result<Vec<StageSpec>> {
    let default: Vec<StageConfig> = catalog
        .stages
        .iter()
        .filter(|s| s.default)
        .map(|s| StageConfig {
            name: s.name.to_string(),
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
        if !valid || cfg.name == DOCUMENTS {
            return job_error!(
                "stage name '{}' must be lower-case letters, digits and '_', and not 'documents'",
                cfg.name
            );
        }
        if out.iter().any(|s| s.name == cfg.name) {
            return job_error!("stage '{}' appears twice", cfg.name);
        }
        let builtin = catalog.stage(&cfg.name);
        let sql = match &cfg.sql {
            Some(path) => {
                let path = base_dir.join(path);
                std::fs::read_to_string(&path).map_err(|e| {
                    Error::Job(format!("stage '{}' sql {}: {e}", cfg.name, path.display()))
                })?
            }
            None => match builtin {
                Some(builtin) => builtin.sql.to_string(),
                None => {
                    return job_error!(
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
                .or_else(|| builtin.map(|b| b.from.to_string())),
            vars: cfg.vars.clone(),
            aliases: builtin.map_or(Vec::new(), |b| {
                b.aliases.iter().map(|a| a.to_string()).collect()
            }),
        });
    }
    Ok(out)
}
