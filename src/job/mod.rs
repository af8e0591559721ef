//! The job file as written (TOML, [`JobFile`]) and the resolved job a run executes ([`Job`]).
//!
//! Relative paths inside a job file are relative to the job file's directory, so a job runs the
//! same from any working directory. Secrets never live here: a model names the environment
//! variable that holds its API key.

pub mod catalog;
pub mod file;
pub mod schema;
pub mod spec;
pub mod template;
mod trust;

pub use trust::KEY_VARS_ENV;
use trust::{JobDir, key_variable, rate};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::escape::redact_url;
use crate::job::catalog::{
    BuiltinFunction, Catalog, DOCUMENTS, SCORE_JSON_TEMPLATE, SCORE_LOGPROBS_TEMPLATE,
    SCORE_TEMPLATE,
};
use crate::job::file::{
    DecontaminateConfig, ExecutionConfig, FunctionConfig, JobFile, ModelConfig, PrepareConfig,
    StageConfig, read_job_table,
};
use crate::job::schema::JsonSchema;
use crate::job::template::{called_functions, render_sql};
use crate::job_error;
use crate::prepare::decontaminate::{Benchmark, Decontamination, Measure};
use crate::prepare::ingest::{MAX_LINE_BYTES, MAX_ROW_GROUP_BYTES, ReadRules};
use crate::prepare::segment::CandidateMode;

pub use crate::job::file::{Api, Overrides};
pub use crate::job::spec::{FunctionSpec, ModelSpec, PrepareSpec, StageSpec};
use crate::job::spec::{check_budget, check_model};

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
    /// Benchmark decontamination, when the job names benchmarks.
    pub decontamination: Option<Decontamination>,
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
        let dir = JobDir {
            base: &base_dir,
            allowed: &overrides.allow_paths,
        };
        let functions = resolve_functions(catalog, &file.functions, &models, &dir)?;
        let stages = resolve_stages(catalog, file.stages.as_deref(), &dir)?;
        let decontamination = file
            .decontaminate
            .as_ref()
            .map(|cfg| resolve_decontamination(cfg, &dir))
            .transpose()?;
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
            decontamination,
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

/// The `[decontaminate]` settings with their defaults, paths resolved, numbers checked.
fn resolve_decontamination(cfg: &DecontaminateConfig, dir: &JobDir) -> Result<Decontamination> {
    let n = cfg.n.unwrap_or(13);
    if !(8..=64).contains(&n) {
        return job_error!(
            "[decontaminate] n = {n}: give 8 to 64 words per n-gram (shorter ones match common phrases)"
        );
    }
    let measure = cfg.measure.unwrap_or(Measure::Any);
    let threshold = cfg.threshold.unwrap_or(match measure {
        Measure::Any => 1.0,
        Measure::Share => 0.5,
    });
    let fits = match measure {
        Measure::Any => threshold >= 1.0,
        Measure::Share => threshold > 0.0 && threshold <= 1.0,
    };
    if !(threshold.is_finite() && fits) {
        return job_error!(
            "[decontaminate] threshold = {threshold}: with measure = \"any\" give a number of shared n-grams (1 or more), with \"share\" a share of the item's n-grams in (0, 1]"
        );
    }
    if cfg.benchmarks.is_empty() {
        return job_error!(
            "[decontaminate] names no benchmark: add [[decontaminate.benchmarks]] with name, paths and fields"
        );
    }
    let mut benchmarks = Vec::new();
    for b in &cfg.benchmarks {
        if b.paths.is_empty() || b.fields.is_empty() {
            return job_error!(
                "[[decontaminate.benchmarks]] '{}' needs paths and fields (e.g. fields = [\"question\", \"answer\"])",
                b.name
            );
        }
        if benchmarks.iter().any(|k: &Benchmark| k.name == b.name) {
            return job_error!("[[decontaminate.benchmarks]] '{}' appears twice", b.name);
        }
        benchmarks.push(Benchmark {
            name: b.name.clone(),
            paths: b
                .paths
                .iter()
                .map(|p| dir.confined(p, &format!("[[decontaminate.benchmarks]] '{}'", b.name)))
                .collect::<Result<_>>()?,
            fields: b.fields.clone(),
            id: b.id.clone(),
        });
    }
    Ok(Decontamination {
        n,
        measure,
        threshold,
        max_items: cfg.max_items.unwrap_or(10).max(1),
        benchmarks,
        files: String::new(),
    })
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
            // The OpenAI key stays with OpenAI even when a job names it, unless the user
            // listed it; another variable a job names goes to the role's endpoints.
            api_key_named: cfg
                .and_then(|c| c.api_key_env.as_deref())
                .is_some_and(|name| name != "OPENAI_API_KEY" || trust::listed_key_variable(name)),
            key_over_http: cfg.is_some_and(|c| c.key_over_http),
            api_key_env: match cfg.and_then(|c| c.api_key_env.clone()) {
                Some(name) => key_variable(&role, name)?,
                None => "OPENAI_API_KEY".to_string(),
            },
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
            requests_per_minute: rate(
                &role,
                "requests_per_minute",
                cfg.and_then(|c| c.requests_per_minute),
            )?,
            input_tokens_per_minute: rate(
                &role,
                "input_tokens_per_minute",
                cfg.and_then(|c| c.input_tokens_per_minute),
            )?,
            output_tokens_per_minute: rate(
                &role,
                "output_tokens_per_minute",
                cfg.and_then(|c| c.output_tokens_per_minute),
            )?,
            price_input_per_mtok: cfg.and_then(|c| c.price_input_per_mtok).unwrap_or(0.0),
            price_output_per_mtok: cfg.and_then(|c| c.price_output_per_mtok).unwrap_or(0.0),
            price_cached_input_per_mtok: cfg
                .and_then(|c| c.price_cached_input_per_mtok.or(c.price_input_per_mtok))
                .unwrap_or(0.0),
            supports_n: cfg.and_then(|c| c.supports_n).unwrap_or(true),
            seed: cfg.and_then(|c| c.seed),
            declared: cfg.is_some() || overrides.endpoint.is_some() || cfgs.is_empty(),
            role: role.clone(),
        };
        let mut spec = spec;
        if let Some(cfg) = cfg {
            add_reasoning_fields(&role, cfg, &mut spec.extra)?;
        }
        spec.max_reply_bytes = cfg
            .and_then(|c| c.max_reply_bytes)
            .unwrap_or((1 << 20) + 256 * spec.max_tokens as usize);
        check_model(&spec)?;
        out.insert(role, spec);
    }
    Ok(out)
}

/// The request fields of `reasoning_effort` and `thinking`, added to `extra` (so they enter
/// request keys and fingerprints like any field); an `extra` that sets them too is refused.
fn add_reasoning_fields(
    role: &str,
    cfg: &ModelConfig,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    const EFFORTS: [&str; 5] = ["none", "minimal", "low", "medium", "high"];
    if let Some(effort) = &cfg.reasoning_effort {
        if !EFFORTS.contains(&effort.as_str()) {
            return job_error!(
                "[models.{role}] reasoning_effort = {effort:?} is not one of {}",
                EFFORTS.join(", ")
            );
        }
        if extra.contains_key("reasoning_effort") {
            return job_error!(
                "[models.{role}] sets reasoning_effort both as a key and in extra; keep one"
            );
        }
        extra.insert("reasoning_effort".into(), effort.clone().into());
    }
    if let Some(thinking) = cfg.thinking {
        let kwargs = template_kwargs(role, extra)?;
        if kwargs.contains_key("enable_thinking") {
            return job_error!(
                "[models.{role}] sets thinking both as a key and in extra.chat_template_kwargs.enable_thinking; keep one"
            );
        }
        kwargs.insert("enable_thinking".into(), thinking.into());
    }
    if let Some(budget) = cfg.thinking_budget {
        let max_tokens = cfg.max_tokens.unwrap_or(u32::MAX);
        if budget == 0 || budget >= max_tokens {
            return job_error!(
                "[models.{role}] thinking_budget = {budget}: give a positive number below max_tokens ({max_tokens}), leaving room for the answer"
            );
        }
        if cfg.thinking == Some(false) {
            return job_error!(
                "[models.{role}] sets thinking_budget with thinking = false; keep one"
            );
        }
        if extra.contains_key("thinking_token_budget") {
            return job_error!(
                "[models.{role}] sets thinking_budget both as a key and in extra; keep one"
            );
        }
        extra.insert("thinking_token_budget".into(), budget.into());
        template_kwargs(role, extra)?.insert("thinking_budget".into(), budget.into());
    }
    Ok(())
}

/// The `chat_template_kwargs` table of a role's `extra`, made when absent.
fn template_kwargs<'a>(
    role: &str,
    extra: &'a mut serde_json::Map<String, serde_json::Value>,
) -> Result<&'a mut serde_json::Map<String, serde_json::Value>> {
    let kwargs = extra
        .entry("chat_template_kwargs")
        .or_insert_with(|| serde_json::json!({}));
    match kwargs.as_object_mut() {
        Some(kwargs) => Ok(kwargs),
        None => job_error!("[models.{role}] extra.chat_template_kwargs must be a table"),
    }
}

fn resolve_functions(
    catalog: &Catalog,
    cfgs: &BTreeMap<String, FunctionConfig>,
    models: &BTreeMap<String, ModelSpec>,
    dir: &JobDir,
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
            resolve_function(catalog, name, cfg, models, dir)
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
    dir: &JobDir,
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
    let (logprobs, json_mode) = match cfg.mode.as_deref() {
        None | Some("text") => (false, false),
        Some("logprobs") if scoring => (true, false),
        Some("json") if scoring => (false, true),
        Some(other) => {
            return job_error!(
                "[functions.{name}] mode = \"{other}\": only scoring functions have modes (text, logprobs, json)"
            );
        }
    };
    let schema = match (&cfg.json_schema, json_mode) {
        (Some(_), true) => {
            return job_error!(
                "[functions.{name}] mode = \"json\" has its own schema ({{reason, score}}); drop json_schema"
            );
        }
        (Some(given), false) => Some(JsonSchema::read(name, given, dir)?),
        (None, true) => Some(JsonSchema::score(name)),
        (None, false) => None,
    };
    if schema.is_some() && model.api == Api::Completions {
        return job_error!(
            "[functions.{name}] has a JSON schema, but its model role '{role}' uses api = \"completions\": structured output and its retries need the chat API"
        );
    }
    let samples = cfg.n.unwrap_or(1);
    if !(1..=MAX_SAMPLES).contains(&samples) {
        return job_error!(
            "[functions.{name}] n = {samples}: give 1 to {MAX_SAMPLES} samples per row"
        );
    }
    if samples > 1 && logprobs {
        return job_error!(
            "[functions.{name}] n = {samples} with mode = \"logprobs\": logprob scoring reads one token's alternatives, which do not vary by sample; use mode = \"text\" or \"json\""
        );
    }
    let schema_retries = cfg.schema_retries.unwrap_or(2);
    if schema_retries > 10 {
        return job_error!("[functions.{name}] schema_retries = {schema_retries}: give at most 10");
    }
    let text_template = base.map(|b| b.template);
    let default_template = if logprobs {
        Some(SCORE_LOGPROBS_TEMPLATE)
    } else if json_mode {
        Some(SCORE_JSON_TEMPLATE)
    } else {
        text_template
    };
    let template = match (cfg.template, default_template) {
        (Some(path), _) => dir.read(&path, &format!("[functions.{name}] template"))?.1,
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
        schema: schema.map(Arc::new),
        schema_retries,
        samples,
    })
}

/// The most samples per row a function may ask for.
pub const MAX_SAMPLES: u32 = 64;

fn resolve_stages(
    catalog: &Catalog,
    cfgs: Option<&[StageConfig]>,
    dir: &JobDir,
) -> Result<Vec<StageSpec>> {
    let default: Vec<StageConfig> = catalog
        .stages
        .iter()
        .filter(|s| s.default)
        .map(|s| StageConfig {
            name: s.name.to_string(),
            sql: None,
            like: None,
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
        // The root's own folders (`_journal`, `_spend`, `_leases`, `_claims`, ...) begin so.
        if cfg.name.starts_with('_') {
            return job_error!(
                "stage name '{}' begins with '_', which is reserved for the output root's own folders (the journal, spend records, leases, claims); rename the stage",
                cfg.name
            );
        }
        if out.iter().any(|s| s.name == cfg.name) {
            return job_error!("stage '{}' appears twice", cfg.name);
        }
        let builtin = match &cfg.like {
            Some(like) => match catalog.stage(like) {
                Some(stage) if cfg.sql.is_none() => Some(stage),
                Some(_) => {
                    return job_error!("stage '{}' has both `like` and `sql`; give one", cfg.name);
                }
                None => {
                    return job_error!(
                        "stage '{}': like = \"{like}\" is not a built-in stage",
                        cfg.name
                    );
                }
            },
            None => catalog.stage(&cfg.name),
        };
        let sql = match &cfg.sql {
            Some(path) => dir.read(path, &format!("stage '{}' sql", cfg.name))?.1,
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
            // A stage `like` a built-in runs its SQL, not under its verbs.
            aliases: builtin
                .filter(|_| cfg.like.is_none())
                .map_or(Vec::new(), |b| {
                    b.aliases.iter().map(|a| a.to_string()).collect()
                }),
        });
    }
    Ok(out)
}
