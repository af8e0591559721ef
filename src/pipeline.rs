//! Running a job: one DataFusion session, stages as SQL over named tables, each stage's result
//! streamed to Parquet under `<output>/<stage>/` and marked complete last.
//!
//! A stage's SQL may return a `_drop` column: rows where it is NULL are the stage's output,
//! the others go to `<stage>/_dropped/` with the reason in `drop_reason`, and every reason is
//! counted in the stage's `_SUCCESS` marker. So every row that entered a stage is either in
//! its output or in a counted drop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::{cast, filter_record_batch, is_null};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::config::Dialect;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::parquet::arrow::AsyncArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::schema::types::ColumnPath;
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use futures::{StreamExt, TryStreamExt};
use object_store::buffered::BufWriter;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::exec::{LlmWindowRule, Window};
use crate::ingest::{IngestCounts, IngestStats, documents_table, split_large_parquet};
use crate::job::{Job, StageSpec};
use crate::journal::Journal;
use crate::llm::{LlmPool, Usage};
use crate::manifest;
use crate::progress::{Progress, Reporter};
use crate::storage::{Location, list_inputs};
use crate::tokens::TokenCounter;
use crate::worker::Worker;
use crate::{exec_err, job_err, udf};

mod exact_dedup;

use exact_dedup::{FirstCopies, KeptCopies, move_repeated_rows};

/// Name of the marker a complete stage output carries; it holds the stage's [`StageStats`].
pub const SUCCESS_MARKER: &str = "_SUCCESS";
/// Column a stage's SQL uses to drop a row with a reason.
pub const DROP_COLUMN: &str = "_drop";
/// Column holding the drop reason in `<stage>/_dropped/`.
pub const DROP_REASON_COLUMN: &str = "drop_reason";
/// Column of the input stage holding the exact-dedup key (a hash of the normalised text).
pub const DEDUP_KEY_COLUMN: &str = "dedup_key";
/// zstd level of every Parquet part a stage writes (the prepare benchmark's floor uses it too).
pub const PART_ZSTD_LEVEL: i32 = 1;
/// Directory of a sharded stage holding one marker per published shard.
pub const SHARDS_DIR: &str = "_shards";

/// The run's settings under the output root, for dataset cards: models, prompts' roles,
/// stages and thresholds (never endpoints or keys).
pub const JOB_FILE: &str = "_job.json";

/// Drop reason of rows whose text a file earlier by path already kept.
pub const ACROSS_FILES: &str = "duplicate_across_files";

/// Name of the table of near-duplicates (`id`, `kept_id`, `similarity`) the runner computes
/// from the `minhash` signatures of the other table a stage reads (see `sql/deduped.sql`).
pub const NEAR_DUPLICATES: &str = "near_duplicates";

/// What one stage did, written to its `_SUCCESS` marker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    /// Stage name.
    pub stage: String,
    /// Rows that entered (= kept + dropped).
    pub rows_in: u64,
    /// Rows in the stage's output.
    pub rows_out: u64,
    /// Dropped rows by reason.
    pub dropped: BTreeMap<String, u64>,
    /// LLM requests and tokens spent by the stage.
    pub llm: Usage,
    /// Documents read and lines skipped, for stages that read the input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<IngestCounts>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Fingerprint of the job's definition of the stage when it was written.
    #[serde(default)]
    pub fingerprint: String,
    /// Ids of the shards the counts cover.
    #[serde(default)]
    pub shards: Vec<String>,
    /// Digest of the upstream markers this output was computed from: when an upstream shard
    /// is redone (say, to retry failed rows), what was computed from it is redone too.
    #[serde(default)]
    pub upstream: String,
}

impl StageStats {
    /// Adds another shard's counts to these.
    fn absorb(&mut self, other: &StageStats) {
        self.rows_in += other.rows_in;
        self.rows_out += other.rows_out;
        for (reason, n) in &other.dropped {
            *self.dropped.entry(reason.clone()).or_default() += n;
        }
        self.llm = self.llm.plus(&other.llm);
        self.seconds += other.seconds;
        if let (Some(mine), Some(theirs)) = (self.input.as_mut(), other.input.as_ref()) {
            mine.documents += theirs.documents;
            for (reason, n) in &theirs.skipped {
                *mine.skipped.entry(reason.clone()).or_default() += n;
            }
        }
    }

    /// A short hash of what the output holds (definition, shards and counts, not timings), so
    /// what was computed from it can tell when it was redone differently.
    pub fn version(&self) -> String {
        use sha2::{Digest, Sha256};
        let key = serde_json::json!([
            self.fingerprint,
            self.shards,
            self.rows_in,
            self.rows_out,
            self.dropped
        ]);
        hex::encode(&Sha256::digest(key.to_string().as_bytes())[..12])
    }

    /// Rows whose LLM call failed after every retry.
    pub fn failed(&self) -> u64 {
        self.dropped.get("llm_error").copied().unwrap_or(0)
    }
}

/// LLM usage read from the call structs of a batch: requests actually sent, calls answered
/// from the journal or shared, failures and tokens paid for.
fn usage_of_calls(batch: &RecordBatch, inherited: &[String]) -> Usage {
    use datafusion::arrow::array::{
        Array, BooleanArray as B, Float64Array, Int32Array, Int64Array, StructArray,
    };
    let reply_type = udf::llm_reply_type();
    let mut usage = Usage::default();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        // Calls carried over from an earlier stage were paid for there.
        if column.data_type() != &reply_type || inherited.contains(field.name()) {
            continue;
        }
        let calls = column
            .as_any()
            .downcast_ref::<StructArray>()
            .expect("a struct");
        let field = |name: &str| calls.column_by_name(name).expect("reply field");
        let attempts = field("attempts");
        let attempts = attempts
            .as_any()
            .downcast_ref::<Int32Array>()
            .expect("Int32");
        let cached = field("cached");
        let cached = cached.as_any().downcast_ref::<B>().expect("Boolean");
        let error = field("error");
        let (prompt, completion) = (field("prompt_tokens"), field("completion_tokens"));
        let prompt = prompt.as_any().downcast_ref::<Int64Array>().expect("Int64");
        let cost = field("cost_usd");
        let cost = cost
            .as_any()
            .downcast_ref::<Float64Array>()
            .expect("Float64");
        let completion = completion
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("Int64");
        for i in 0..calls.len() {
            if calls.is_null(i) {
                continue;
            }
            if !error.is_null(i) {
                usage.failures += 1;
            }
            if cached.value(i) {
                if attempts.value(i) == 0 {
                    usage.journaled += 1;
                } else {
                    usage.shared += 1;
                }
                continue;
            }
            usage.requests += attempts.value(i).max(0) as u64;
            usage.prompt_tokens += prompt.value(i).max(0) as u64;
            usage.completion_tokens += completion.value(i).max(0) as u64;
            usage.cost_usd += cost.value(i);
        }
    }
    usage
}

/// Builds the session every command uses: list-files cache off (stages read what earlier
/// stages wrote in the same process), LLM calls planned with [`LlmWindowExec`](crate::exec).
pub fn new_session(target_partitions: Option<usize>, window: Window) -> Result<SessionContext> {
    let mut config = SessionConfig::new();
    // Leaf-expression pushdown copies `call['text']` down to the call and so duplicates the
    // async LLM call once per field read (4 requests a row for backtranslated.sql).
    config
        .options_mut()
        .optimizer
        .enable_leaf_expression_pushdown = false;
    if let Some(p) = target_partitions {
        config = config.with_target_partitions(p.max(1));
    }
    let runtime = RuntimeEnvBuilder::new()
        .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
        .build_arc()?;
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_physical_optimizer_rule(Arc::new(LlmWindowRule::new(window)))
        .build();
    Ok(SessionContext::new_with_state(state))
}

/// Registers the object store of `location` with `ctx` (local disk is always known).
pub fn register_store(ctx: &SessionContext, location: &Location) {
    if location.store_url.scheme() != "file" {
        ctx.register_object_store(&location.store_url, Arc::clone(&location.store));
    }
}

/// Reads the `_SUCCESS` marker of `stage` under `root`, or `None` when the stage is not complete.
pub async fn read_stage_stats(root: &Location, stage: &str) -> Result<Option<StageStats>> {
    read_json(root, &root.child(stage).path(SUCCESS_MARKER)).await
}

/// A session over the run under `root`: every complete stage registered as a table (for the
/// commands that read a run: `sql`, `stats`, `report`, `export`). Fails when there is none.
pub async fn open_root(root: &Location) -> Result<(SessionContext, Vec<String>)> {
    let ctx = new_session(None, Window::for_cap(1))?;
    register_store(&ctx, root);
    let stages = require_any_stage(root).await?;
    let registered = register_complete_stages(&ctx, root, stages.clone()).await?;
    register_dropped_rows(&ctx, root, &registered).await?;
    Ok((ctx, stages))
}

/// Registers the rows each of `stages` (complete, registered) dropped (`<stage>/_dropped/`,
/// the reason in `drop_reason`) as the table `<stage>_dropped`, so SQL can show what a rule
/// removed (empty when the stage dropped nothing); no stage's own table is shadowed.
async fn register_dropped_rows(
    ctx: &SessionContext,
    root: &Location,
    stages: &[String],
) -> Result<()> {
    for stage in stages {
        let table = format!("{stage}_dropped");
        if stages.contains(&table) {
            continue;
        }
        let dir = root.child(stage).child("_dropped");
        let mut parts = dir.store.list(Some(&dir.prefix));
        if parts.try_next().await?.is_some() {
            ctx.register_parquet(&table, dir.dir_url(), ParquetReadOptions::default())
                .await?;
        }
    }
    Ok(())
}

/// Registers every complete stage output under `root` as a table; returns their names.
pub async fn register_complete_stages(
    ctx: &SessionContext,
    root: &Location,
    stages: impl IntoIterator<Item = String>,
) -> Result<Vec<String>> {
    let mut registered = Vec::new();
    for stage in stages {
        if read_stage_stats(root, &stage).await?.is_some() {
            register_stage_table(ctx, root, &stage).await?;
            registered.push(stage);
        }
    }
    Ok(registered)
}

async fn register_stage_table(ctx: &SessionContext, root: &Location, stage: &str) -> Result<()> {
    ctx.deregister_table(stage)?;
    ctx.register_parquet(
        stage,
        root.child(stage).dir_url(),
        ParquetReadOptions::default(),
    )
    .await?;
    Ok(())
}

/// Stage names found under `root` (directories with a `_SUCCESS` marker).
pub async fn complete_stages_under(root: &Location) -> Result<Vec<String>> {
    let listing = root.store.list_with_delimiter(Some(&root.prefix)).await?;
    let mut names = Vec::new();
    for dir in listing.common_prefixes {
        let Some(name) = dir.filename() else { continue };
        if !name.starts_with(['_', '.']) && read_stage_stats(root, name).await?.is_some() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Summary of a run, one entry per stage run.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Stats of the stages that ran, in order.
    pub stages: Vec<StageStats>,
}

impl RunSummary {
    /// Rows whose LLM call failed after every retry, over all stages.
    pub fn llm_failures(&self) -> u64 {
        self.stages.iter().map(StageStats::failed).sum()
    }
}

/// Options of one `backforth run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stages to run (all when empty); verbs such as `prepare` are accepted.
    pub stages: Vec<String>,
    /// This process's share of the shards.
    pub worker: Worker,
    /// Continue although the job changed since the output root was written: stages whose
    /// fingerprint changed are recomputed (the journal still answers unchanged requests).
    pub allow_changes: bool,
}

/// A stage as planned for this run: its SQL, the tables it reads, its fingerprint.
#[derive(Debug, Clone)]
struct StagePlan {
    name: String,
    sql: String,
    tables: Vec<String>,
    fingerprint: String,
}

impl StagePlan {
    /// The one earlier stage a stage reads, when that is all it reads: such a stage runs shard
    /// by shard, each shard of its input giving one shard of its output.
    fn sharded_on<'a>(&'a self, job: &Job) -> Option<&'a str> {
        // The near-duplicate table is derived from the stage's input, not a second input.
        let inputs: Vec<&String> = self
            .tables
            .iter()
            .filter(|t| *t != NEAR_DUPLICATES)
            .collect();
        match inputs.as_slice() {
            [one] if job.stages.iter().any(|s| &s.name == *one) => Some(one.as_str()),
            _ => None,
        }
    }

    fn reads_near_duplicates(&self) -> bool {
        self.tables.iter().any(|t| t == NEAR_DUPLICATES)
    }
}

/// The near-duplicate table of a run and the version of the stage it was computed from.
struct NearDuplicates {
    table: Arc<datafusion::datasource::MemTable>,
    version: String,
}

/// The marker of one shard of the stage that reads the input: its counts, and what its
/// exact dedup against other shards relied on.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InputShardMarker {
    #[serde(flatten)]
    stats: StageStats,
    /// Of the rows dropped as `duplicate_across_files`, those dropped while the shard ran;
    /// the others were moved out of its parts by the pass after every shard.
    #[serde(default)]
    dropped_while_running: u64,
    /// Shard id -> input of the shards whose kept copies made this one drop rows while it
    /// ran: if one of those inputs changes, the drops may no longer hold, so this shard is
    /// redone too.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    outranked_by: BTreeMap<String, String>,
}

/// Where the marker publishing shard `id` of the stage under `stage_dir` is written.
fn shard_marker_path(stage_dir: &Location, id: &str) -> object_store::path::Path {
    stage_dir.child(SHARDS_DIR).path(&format!("{id}.json"))
}

/// Id of the `k`-th shard of the stage that reads the input.
fn input_shard_id(k: usize) -> String {
    format!("{k:05}")
}

/// What every stage of a run shares.
struct Runner<'a> {
    job: &'a Job,
    root: Location,
    pool: Arc<LlmPool>,
    journal: Arc<Journal>,
    tokens: TokenCounter,
    window: Window,
    worker: Worker,
    plans: Vec<StagePlan>,
    fingerprints: BTreeMap<String, manifest::Fingerprint>,
    progress: Arc<Progress>,
}

/// Runs the stages of `job` that `opts` selects, in job order.
pub async fn run(job: &Job, opts: &RunOptions) -> Result<RunSummary> {
    let to_run = job.select_stages(&opts.stages)?;
    let root = Location::parse(&job.output)?;
    // Only for measuring what the journal costs (benches/llm_stage.rs); never in production.
    let journal = if std::env::var("BACKFORTH_JOURNAL").as_deref() == Ok("off") {
        tracing::warn!(
            "BACKFORTH_JOURNAL=off: completed LLM calls are not recorded and would be paid again after a crash."
        );
        Arc::new(Journal::disabled())
    } else {
        Arc::new(Journal::open(&root).await?)
    };
    if journal.loaded() > 0 {
        tracing::info!(responses = journal.loaded(), "Response journal loaded.");
    }
    let pool = Arc::new(LlmPool::new(
        job.models.values(),
        Arc::clone(&journal),
        job.execution.budget_usd,
    ));
    let mut runner = Runner::new(job, root, pool, journal, opts.worker)?;
    runner.reconcile_manifest(opts.allow_changes).await?;
    let mut summary = RunSummary::default();
    for plan in runner.plans.clone() {
        if !to_run.contains(&plan.name) {
            continue;
        }
        let started = Instant::now();
        tracing::info!(stage = %plan.name, "Stage started.");
        runner.progress = Arc::new(Progress::default());
        let _reporter = Reporter::start(
            &plan.name,
            Arc::clone(&runner.progress),
            Arc::clone(&runner.pool),
        );
        let mut stats = match plan.sharded_on(job) {
            Some(upstream) => runner.run_sharded(&plan, upstream).await?,
            None => runner.run_global(&plan).await?,
        };
        runner.journal.check()?;
        if let Some(quota) = runner
            .pool
            .quota_exhausted()
            .or_else(|| runner.pool.budget_spent())
        {
            return Err(Error::Execution(format!(
                "stage '{}' stopped: {quota}. Completed work is kept ({} rows of this stage are in `{}/_dropped/` with reason llm_error); rerun when the quota is restored",
                plan.name,
                stats.failed(),
                plan.name
            )));
        }
        stats.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            stage = %plan.name,
            rows_in = stats.rows_in,
            rows_out = stats.rows_out,
            requests = stats.llm.requests,
            journaled = stats.llm.journaled,
            seconds = format!("{:.1}", stats.seconds),
            "Stage done."
        );
        summary.stages.push(stats);
    }
    Ok(summary)
}

impl<'a> Runner<'a> {
    fn new(
        job: &'a Job,
        root: Location,
        pool: Arc<LlmPool>,
        journal: Arc<Journal>,
        worker: Worker,
    ) -> Result<Self> {
        let mut runner = Runner {
            job,
            window: Window::for_cap(pool.max_concurrency()),
            tokens: TokenCounter::load(&job.prepare.tokenizer, &job.base_dir)?,
            root,
            pool,
            journal,
            worker,
            plans: Vec::new(),
            fingerprints: BTreeMap::new(),
            progress: Arc::new(Progress::default()),
        };
        runner.plan_stages()?;
        Ok(runner)
    }
}

/// The requests `stage` would send, in the OpenAI batch format (`custom_id` = request key),
/// for `vllm run-batch` or the OpenAI Batch API; requests already answered in the journal are
/// left out. The stage's inputs must be complete; nothing is sent and nothing is written.
pub async fn capture_stage_requests(job: &Job, stage: &str) -> Result<Vec<serde_json::Value>> {
    let root = Location::parse(&job.output)?;
    let journal = Arc::new(Journal::open(&root).await?);
    let capture = Arc::new(crate::llm::Capture::default());
    let pool = Arc::new(LlmPool::capturing(
        job.models.values(),
        Arc::clone(&journal),
        Arc::clone(&capture),
    ));
    let runner = Runner::new(job, root, pool, journal, Worker::default())?;
    let plan = runner.plan(crate::job::canonical_stage_name(stage))?;
    let ctx = runner.session()?;
    for table in &plan.tables {
        if table == "documents" {
            return job_err!(
                "stage '{}' reads the input and calls no LLM; there is nothing to batch",
                plan.name
            );
        }
        runner.require_complete(&plan.name, table).await?;
        register_stage_table(&ctx, &runner.root, table).await?;
    }
    let mut stream = ctx.sql(&plan.sql).await?.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        batch?;
    }
    Ok(capture.lines())
}

/// Records the results of an offline batch (`vllm run-batch` output, or an OpenAI Batch
/// output file) in the journal of `job`'s output root, keyed by `custom_id`, so the next run
/// answers those requests without sending them. Returns (recorded, failed) line counts.
pub async fn import_batch_results(job: &Job, file: &str, text: &str) -> Result<(u64, u64)> {
    let root = Location::parse(&job.output)?;
    let journal = Journal::open(&root).await?;
    let mut replies = Vec::new();
    let mut failed = 0;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |message: String| Error::Input {
            file: file.to_string(),
            line: i as u64 + 1,
            message,
        };
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| bad(format!("not valid JSON: {e}; is this a batch output file?")))?;
        let key = v["custom_id"]
            .as_str()
            .ok_or_else(|| bad("no custom_id; is this a batch output file?".into()))?
            .to_string();
        let response = &v["response"];
        let ok = response["status_code"].as_u64() == Some(200) && v["error"].is_null();
        let parsed = ok
            .then(|| crate::llm::parse_any_completion(&response["body"]))
            .and_then(|r| r.ok());
        match parsed {
            Some(reply) => replies.push((key, reply)),
            None => failed += 1,
        }
    }
    let recorded = replies.len() as u64;
    futures::future::join_all(replies.iter().map(|(k, r)| journal.record(k, r))).await;
    journal.check()?;
    Ok((recorded, failed))
}

impl Runner<'_> {
    /// A fresh session with every function registered; one per stage or shard, so shards
    /// can bind the same table name to different files at the same time.
    fn session(&self) -> Result<SessionContext> {
        self.session_with(self.job.execution.target_partitions)
    }

    fn session_with(&self, target_partitions: Option<usize>) -> Result<SessionContext> {
        let ctx = new_session(target_partitions, self.window)?;
        register_store(&ctx, &self.root);
        let functions: Vec<_> =
            self.job
                .functions
                .iter()
                .map(|f| {
                    let client =
                        self.pool.model(&f.role).cloned().ok_or_else(|| {
                            Error::Internal(format!("no client for role {}", f.role))
                        })?;
                    Ok((f.clone(), client))
                })
                .collect::<Result<_>>()?;
        udf::register_all(
            &ctx,
            &functions,
            self.tokens.clone(),
            udf::PrepareRules {
                quality: self.job.prepare.quality.clone(),
                near_dedup: self.job.prepare.near_dedup.unwrap_or_default(),
            },
        )?;
        Ok(ctx)
    }

    fn plan_stages(&mut self) -> Result<()> {
        let ctx = self.session()?;
        let mut rendered = Vec::new();
        for stage in &self.job.stages {
            let sql = render_sql(self.job, stage)?;
            let tables = referenced_tables(&ctx, &sql, &stage.name)?;
            for f in self.job.functions_in(&sql) {
                if !self.job.models[&f.role].declared {
                    return job_err!(
                        "stage '{}' calls {}, whose model role '{}' is not in the job: add [models.{}] (or pass --endpoint)",
                        stage.name,
                        f.name,
                        f.role,
                        f.role
                    );
                }
            }
            for table in &tables {
                let known = table == "documents"
                    || (table == NEAR_DUPLICATES && tables.len() == 2)
                    || self
                        .job
                        .stages
                        .iter()
                        .take_while(|s| s.name != stage.name)
                        .any(|s| &s.name == table);
                if !known {
                    return job_err!(
                        "stage '{}' reads table '{table}', which is neither 'documents' nor an earlier stage of this job",
                        stage.name
                    );
                }
            }
            rendered.push((stage.name.clone(), sql, tables));
        }
        let fingerprints = manifest::fingerprint_stages(self.job, &rendered);
        self.plans = rendered
            .into_iter()
            .map(|(name, sql, tables)| StagePlan {
                fingerprint: fingerprints[&name].digest(),
                name,
                sql,
                tables,
            })
            .collect();
        self.fingerprints = fingerprints;
        Ok(())
    }

    /// Compares the job with the manifest of the output root: a changed stage is refused, or
    /// with `allow_changes` its outputs (and those of the stages after it) are removed.
    async fn reconcile_manifest(&self, allow_changes: bool) -> Result<()> {
        if let Some(recorded) = manifest::read(&self.root).await? {
            let mut changed = Vec::new();
            for (stage, changes) in manifest::changed_stages(&recorded, &self.fingerprints) {
                if self
                    .root
                    .exists(&self.root.child(&stage).path(SUCCESS_MARKER))
                    .await?
                    || self.has_shard_markers(&stage).await?
                {
                    changed.push((stage, changes));
                }
            }
            if !changed.is_empty() && !allow_changes {
                let list: Vec<String> = changed
                    .iter()
                    .map(|(stage, what)| format!("{stage} ({})", what.join(", ")))
                    .collect();
                return job_err!(
                    "{} was written by a different version of this job; changed since: {}. \
                     Pass --allow-changes to recompute those stages (recorded LLM responses to unchanged requests are reused), or choose another --output",
                    self.root.describe(),
                    list.join("; ")
                );
            }
            for (stage, _) in &changed {
                tracing::warn!(stage = %stage, "Job changed: recomputing the stage.");
                self.root.child(stage).delete_all().await?;
            }
        }
        manifest::write(
            &self.root,
            &manifest::Manifest {
                job: self.job.name.clone(),
                stages: self.fingerprints.clone(),
                order: self.job.stages.iter().map(|s| s.name.clone()).collect(),
            },
        )
        .await?;
        write_json(&self.root, &self.root.path(JOB_FILE), &self.job.settings()).await
    }

    async fn has_shard_markers(&self, stage: &str) -> Result<bool> {
        let dir = self.root.child(stage).child(SHARDS_DIR);
        Ok(dir
            .store
            .list(Some(&dir.prefix))
            .next()
            .await
            .transpose()?
            .is_some())
    }

    /// The stage's `_SUCCESS`, if it is complete under the current fingerprint.
    async fn complete(&self, plan: &StagePlan) -> Result<Option<StageStats>> {
        Ok(read_stage_stats(&self.root, &plan.name)
            .await?
            .filter(|s| s.fingerprint == plan.fingerprint))
    }

    /// Runs a stage over all its input at once (stages reading `documents` or several
    /// tables). Worker 0 runs it; other workers wait for its `_SUCCESS`.
    async fn run_global(&self, plan: &StagePlan) -> Result<StageStats> {
        if plan.tables.iter().any(|t| t == "documents") {
            if self.worker.index != 0 {
                return self.wait_for(plan).await;
            }
            return self.run_input_stage(plan).await;
        }
        let mut upstream = Vec::new();
        for table in plan.tables.iter().filter(|t| *t != "documents") {
            self.require_complete(&plan.name, table).await?;
            let path = self.root.child(table).path(SUCCESS_MARKER);
            let stats = read_json::<StageStats>(&self.root, &path).await?;
            upstream.push(stats.map(|s| s.version()).unwrap_or_default());
        }
        let upstream = upstream.join("+");
        if let Some(done) = self.complete(plan).await?
            && done.failed() == 0
            && done.upstream == upstream
        {
            tracing::info!(stage = %plan.name, "Already complete; skipped.");
            return Ok(done);
        }
        if self.worker.index != 0 {
            return self.wait_for(plan).await;
        }
        let ctx = self.session()?;
        for table in &plan.tables {
            register_stage_table(&ctx, &self.root, table).await?;
        }
        let out = self.root.child(&plan.name);
        // A rerun replaces the stage: the marker goes first, so a crash leaves it incomplete.
        delete_if_exists(&self.root, &out.path(SUCCESS_MARKER)).await?;
        out.delete_all().await?;
        let mut stats = self
            .execute(
                &ctx,
                plan,
                &out,
                PartNames::Numbered {
                    prefix: None,
                    rows: self.shard_rows(),
                },
            )
            .await?;
        stats.upstream = upstream;
        write_json(&self.root, &out.path(SUCCESS_MARKER), &stats).await?;
        Ok(stats)
    }

    /// Runs `plan`'s SQL in `ctx` and writes it under `out`; the counts name the stage, its
    /// fingerprint and the parts written.
    async fn execute(
        &self,
        ctx: &SessionContext,
        plan: &StagePlan,
        out: &Location,
        names: PartNames,
    ) -> Result<StageStats> {
        self.execute_with(ctx, plan, out, names, None).await
    }

    async fn execute_with(
        &self,
        ctx: &SessionContext,
        plan: &StagePlan,
        out: &Location,
        names: PartNames,
        first_copies: Option<FirstCopies>,
    ) -> Result<StageStats> {
        // A task of its own, so shards running side by side also encode their Parquet on
        // different threads.
        let (stats, shards) = tokio::spawn(execute_to_parts(
            ctx.clone(),
            plan.sql.clone(),
            plan.tables.clone(),
            out.clone(),
            names,
            Arc::clone(&self.progress),
            first_copies,
        ))
        .await
        .map_err(|e| Error::Internal(format!("a stage's writer task failed: {e}")))??;
        Ok(StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            shards,
            ..stats
        })
    }

    fn shard_rows(&self) -> usize {
        self.job.execution.shard_rows.unwrap_or(10_000).max(1)
    }

    /// Runs the stage that reads `documents`: each input file (or row-group range of a large
    /// Parquet file) is a shard, run in parallel with the others, published by its marker
    /// and skipped on rerun. Then exact duplicates across files are dropped in one pass.
    async fn run_input_stage(&self, plan: &StagePlan) -> Result<StageStats> {
        let mut files = Vec::new();
        for input in &self.job.inputs {
            files.extend(list_inputs(input).await?);
        }
        let shard_bytes = self
            .job
            .execution
            .input_shard_bytes
            .unwrap_or(256 << 20)
            .max(1);
        let files = split_large_parquet(files, shard_bytes).await?;
        let sources: BTreeMap<String, String> = files
            .iter()
            .enumerate()
            .map(|(k, file)| {
                (
                    input_shard_id(k),
                    format!("{} ({} bytes)", file.describe(), file.size),
                )
            })
            .collect();
        let kept = Arc::new(KeptCopies::new(files.iter().map(|f| f.display.as_str())));
        let out = self.root.child(&plan.name);
        self.progress
            .shards_total
            .store(files.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let parallel = self
            .job
            .execution
            .target_partitions
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        let results: Vec<Result<(String, String, InputShardMarker)>> =
            futures::stream::iter(files.into_iter().enumerate())
                .map(|(k, file)| {
                    let (sources, kept) = (&sources, &kept);
                    async move {
                        let shown = file.display.clone();
                        let marker = self.input_shard(plan, k, file, sources, kept).await?;
                        self.progress
                            .shards_done
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Ok((input_shard_id(k), shown, marker))
                    }
                })
                .buffered(parallel)
                .collect()
                .await;
        let mut shards = Vec::new();
        for r in results {
            shards.push(r?);
        }
        self.drop_duplicates_across_files(plan, &mut shards).await?;
        let mut total = StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            input: Some(IngestCounts::default()),
            ..StageStats::default()
        };
        let mut parts = Vec::new();
        for (_, _, marker) in &shards {
            parts.extend(marker.stats.shards.iter().cloned());
            total.absorb(&marker.stats);
        }
        total.shards = parts;
        write_json(&self.root, &out.path(SUCCESS_MARKER), &total).await?;
        Ok(total)
    }

    /// Shard `k` of the input stage: its marker when it was published under this definition
    /// and every input its dedup relied on is unchanged, else the shard run and published
    /// now. `sources` holds each shard's input by id.
    async fn input_shard(
        &self,
        plan: &StagePlan,
        k: usize,
        file: crate::storage::InputFile,
        sources: &BTreeMap<String, String>,
        kept: &Arc<KeptCopies>,
    ) -> Result<InputShardMarker> {
        let id = input_shard_id(k);
        let source = sources[&id].clone();
        let path = shard_marker_path(&self.root.child(&plan.name), &id);
        if let Some(done) = read_json::<InputShardMarker>(&self.root, &path).await?
            && done.stats.fingerprint == plan.fingerprint
            && done.stats.upstream == source
            && done
                .outranked_by
                .iter()
                .all(|(id, input)| sources.get(id) == Some(input))
        {
            return Ok(done);
        }
        let dedup = FirstCopies::new(Arc::clone(kept), k as u32);
        let stats = self.run_input_shard(plan, &id, file, dedup).await?;
        let outranked_by = kept
            .outranking(k as u32)
            .into_iter()
            .map(|j| {
                let id = input_shard_id(j as usize);
                let input = sources[&id].clone();
                (id, input)
            })
            .collect();
        let marker = InputShardMarker {
            dropped_while_running: stats.dropped.get(ACROSS_FILES).copied().unwrap_or(0),
            outranked_by,
            stats: StageStats {
                upstream: source,
                ..stats
            },
        };
        write_json(&self.root, &path, &marker).await?;
        Ok(marker)
    }

    async fn run_input_shard(
        &self,
        plan: &StagePlan,
        id: &str,
        file: crate::storage::InputFile,
        dedup: FirstCopies,
    ) -> Result<StageStats> {
        let out = self.root.child(&plan.name);
        // Parts of an attempt that died before its marker are replaced, never mixed in.
        delete_parts_of(&out, id).await?;
        delete_parts_of(&out.child("_dropped"), id).await?;
        // One partition: rows reach the writer in the file's order, which is what makes the
        // first copy of a text the same one on every run. Shards run side by side instead.
        let ctx = self.session_with(Some(1))?;
        let ingest = Arc::new(IngestStats::default());
        ctx.register_table(
            "documents",
            Arc::new(documents_table(
                vec![file],
                self.job.on_bad_line,
                Arc::clone(&ingest),
            )?),
        )?;
        let mut stats = self
            .execute_with(
                &ctx,
                plan,
                &out,
                PartNames::Numbered {
                    prefix: Some(id.to_string()),
                    rows: self.shard_rows(),
                },
                Some(dedup),
            )
            .await?;
        stats.input = Some(ingest.snapshot());
        Ok(stats)
    }

    /// Drops kept rows whose `dedup_key` a file earlier by path (or an earlier row of the same
    /// file, when a large file ran as several shards) also kept, which their shards could not
    /// drop while running: the copy with the smallest (file, line, ordinal) survives, whatever
    /// order the shards ran in. Affected parts are rewritten, the rows moved to
    /// `_dropped/<part>-across.parquet` under `duplicate_across_files`, and each shard's
    /// marker counts them with those it dropped itself. Safe to repeat after a crash at any
    /// point.
    async fn drop_duplicates_across_files(
        &self,
        plan: &StagePlan,
        shards: &mut [(String, String, InputShardMarker)],
    ) -> Result<()> {
        let out = self.root.child(&plan.name);
        let ctx = self.session()?;
        register_stage_table(&ctx, &self.root, &plan.name).await?;
        let schema = ctx.table(plan.name.as_str()).await?.schema().clone();
        let needed = [DEDUP_KEY_COLUMN, "file", "line", "ordinal", "id"];
        if shards.len() < 2
            || needed
                .iter()
                .any(|c| !schema.has_column_with_unqualified_name(c))
        {
            return Ok(());
        }
        let batches = ctx
            .sql(&format!(
                // Repeats are rare: a hash aggregate finds their keys, and only those rows are
                // ranked (sorting every row's key cost more than the rest of the pass).
                "WITH repeated AS (SELECT dedup_key FROM {t} WHERE dedup_key IS NOT NULL \
                 GROUP BY dedup_key HAVING count(*) > 1) \
                 SELECT file, id FROM (SELECT file, id, row_number() OVER (PARTITION BY dedup_key \
                 ORDER BY file, line, ordinal) AS copy FROM {t} \
                 WHERE dedup_key IN (SELECT dedup_key FROM repeated)) \
                 WHERE copy > 1",
                t = plan.name
            ))
            .await?
            .collect()
            .await?;
        // file -> ids of its rows that a copy elsewhere outranks.
        let mut repeated: HashMap<String, HashSet<String>> = HashMap::new();
        for batch in &batches {
            let (files, ids) = (
                cast(batch.column(0), &DataType::Utf8)?,
                cast(batch.column(1), &DataType::Utf8)?,
            );
            let (files, ids) = (files.as_string::<i32>(), ids.as_string::<i32>());
            for r in 0..batch.num_rows() {
                repeated
                    .entry(files.value(r).to_string())
                    .or_default()
                    .insert(ids.value(r).to_string());
            }
        }
        let repeated = Arc::new(repeated);
        // Each part on a task of its own, several at once: copies the shards could not drop
        // while they ran (those of shards run side by side, or in another run) can be spread
        // over many parts.
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (out_dir, repeated) = (&out, &repeated);
        let moves = shards
            .iter()
            .enumerate()
            .flat_map(|(k, (_, file, marker))| {
                marker.stats.shards.iter().map(move |part| {
                    let (root, out, part) = (self.root.clone(), out_dir.clone(), part.clone());
                    let (repeated, file) = (Arc::clone(repeated), file.clone());
                    tokio::spawn(async move {
                        let ids = repeated.get(&file);
                        let moved = move_repeated_rows(&root, &out, &part, ids).await;
                        moved.map(|n| (k, n))
                    })
                })
            });
        // Unordered: a part being rewritten must not hold up the parts queued after it.
        let counts: Vec<(usize, u64)> = futures::stream::iter(moves)
            .buffer_unordered(parallel)
            .map(|joined| {
                joined.map_err(|e| Error::Internal(format!("moving repeated rows: {e}")))?
            })
            .try_collect()
            .await?;
        let mut moved_from = vec![0; shards.len()];
        for (k, n) in counts {
            moved_from[k] += n;
        }
        for ((shard, _, marker), moved) in shards.iter_mut().zip(moved_from) {
            let across = marker.dropped_while_running + moved;
            let stats = &mut marker.stats;
            let before = stats.dropped.get(ACROSS_FILES).copied().unwrap_or(0);
            if across != before {
                if across == 0 {
                    stats.dropped.remove(ACROSS_FILES);
                } else {
                    stats.dropped.insert(ACROSS_FILES.to_string(), across);
                }
                stats.rows_out = stats.rows_in - stats.dropped.values().sum::<u64>();
                let path = shard_marker_path(&out, shard);
                write_json(&self.root, &path, &*marker).await?;
            }
        }
        Ok(())
    }

    async fn wait_for(&self, plan: &StagePlan) -> Result<StageStats> {
        tracing::info!(
            stage = %plan.name,
            "Waiting for worker 0 to complete this stage (it reads the whole input)."
        );
        loop {
            if let Some(done) = self.complete(plan).await? {
                return Ok(done);
            }
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    }

    async fn require_complete(&self, stage: &str, table: &str) -> Result<()> {
        let plan = self.plan(table)?;
        if self.complete(plan).await?.is_none() {
            return job_err!(
                "stage '{stage}' reads '{table}', which has no complete output under {}; run it first (--stages {table})",
                self.root.describe()
            );
        }
        Ok(())
    }

    fn plan(&self, stage: &str) -> Result<&StagePlan> {
        self.plans
            .iter()
            .find(|p| p.name == stage)
            .ok_or_else(|| Error::Internal(format!("no plan for stage {stage}")))
    }

    /// The shard ids of a sharded stage: those of the stage that read the whole input
    /// upstream of it.
    async fn shard_ids(&self, plan: &StagePlan) -> Result<Vec<String>> {
        let mut current = plan;
        while let Some(upstream) = current.sharded_on(self.job) {
            current = self.plan(upstream)?;
        }
        match self.complete(current).await? {
            Some(stats) => Ok(stats.shards),
            None => job_err!(
                "stage '{}' works on the shards of '{}', which has no complete output under {}; run it first (--stages {})",
                plan.name,
                current.name,
                self.root.describe(),
                current.name
            ),
        }
    }

    /// Runs a stage shard by shard: each shard's output is written, then published by its
    /// marker; shards already published under the same fingerprint (and without failed
    /// rows) are skipped; this worker takes the shards it owns.
    async fn run_sharded(&self, plan: &StagePlan, upstream: &str) -> Result<StageStats> {
        let ids = self.shard_ids(plan).await?;
        // Pass 2 of near-dedup: every worker computes the same clusters from all signatures.
        let near = if plan.reads_near_duplicates() {
            Some(self.near_duplicates(plan, upstream).await?)
        } else {
            None
        };
        let near = near.as_ref();
        let mine: Vec<&String> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| self.worker.owns(*i))
            .map(|(_, id)| id)
            .collect();
        let up_plan = self.plan(upstream)?;
        self.progress
            .shards_total
            .store(mine.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // Enough shards at once that twice the server's slots always have rows waiting, so
        // no shard's tail (or the next shard's start) leaves slots idle.
        let needed = (2 * self.pool.max_concurrency()).div_ceil(self.shard_rows()) + 1;
        let concurrent = self
            .job
            .execution
            .concurrent_shards
            .unwrap_or(needed.max(2))
            .max(1);
        let results: Vec<Result<StageStats>> = futures::stream::iter(mine)
            .map(|id| async move {
                let stats = self.run_shard(plan, up_plan, id, near).await;
                self.progress
                    .shards_done
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stats
            })
            .buffer_unordered(concurrent)
            .collect()
            .await;
        let mut total = StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            ..StageStats::default()
        };
        for r in results {
            total.absorb(&r?);
        }
        self.publish_if_all_shards(plan, &ids).await?;
        Ok(total)
    }

    /// The near-duplicates of `from` (every shard's signatures) and the version of `from` they
    /// were computed on, which every shard reading them depends on.
    async fn near_duplicates(&self, plan: &StagePlan, from: &str) -> Result<NearDuplicates> {
        self.require_complete(&plan.name, from).await?;
        let ctx = self.session()?;
        register_stage_table(&ctx, &self.root, from).await?;
        let schema = ctx.table(from).await?.schema().clone();
        if !schema.has_column_with_unqualified_name("minhash") {
            return job_err!(
                "stage '{}' reads {NEAR_DUPLICATES}, which needs the `minhash` signatures of '{from}': add [prepare.near_dedup] to the job",
                plan.name
            );
        }
        let params = self.job.prepare.near_dedup.unwrap_or_default();
        let mut stream = ctx
            .sql(&format!(
                "SELECT id, minhash FROM {from} WHERE minhash IS NOT NULL"
            ))
            .await?
            .execute_stream()
            .await?;
        let mut sigs = crate::minhash::Signatures::new(params.num_perm());
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let ids = cast(batch.column(0), &DataType::Utf8)?;
            let ids = ids.as_string::<i32>();
            let lists = batch.column(1).as_list::<i32>();
            let values = lists
                .values()
                .as_primitive::<datafusion::arrow::datatypes::UInt32Type>()
                .values();
            for (r, ends) in lists.value_offsets().windows(2).enumerate() {
                let sig = &values[ends[0] as usize..ends[1] as usize];
                if !sigs.push(ids.value(r), sig) {
                    return job_err!(
                        "stage '{}': the signature of '{}' in '{from}' has {} values, but [prepare.near_dedup] makes {} (bands x rows): run '{from}' again with these settings",
                        plan.name,
                        ids.value(r),
                        sig.len(),
                        params.num_perm()
                    );
                }
            }
        }
        let found = tokio::task::spawn_blocking(move || crate::minhash::duplicates(&sigs, &params))
            .await
            .map_err(|e| Error::Internal(format!("near-dedup task: {e}")))?;
        tracing::info!(stage = %plan.name, duplicates = found.len(), "Near-duplicates found.");
        let table_schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("kept_id", DataType::Utf8, false),
            Field::new("similarity", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            table_schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    found.iter().map(|d| d.id.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    found.iter().map(|d| d.kept_id.as_str()),
                )),
                Arc::new(datafusion::arrow::array::Float64Array::from_iter_values(
                    found.iter().map(|d| d.similarity),
                )),
            ],
        )?;
        let table = datafusion::datasource::MemTable::try_new(table_schema, vec![vec![batch]])?;
        let version = read_stage_stats(&self.root, from)
            .await?
            .map(|s| s.version())
            .unwrap_or_default();
        Ok(NearDuplicates {
            table: Arc::new(table),
            version,
        })
    }

    async fn run_shard(
        &self,
        plan: &StagePlan,
        up: &StagePlan,
        id: &str,
        near: Option<&NearDuplicates>,
    ) -> Result<StageStats> {
        let out = self.root.child(&plan.name);
        let marker = shard_marker_path(&out, id);
        let up_file = self
            .root
            .child(&up.name)
            .path(&format!("part-{id}.parquet"));
        let shard_marker = |name: &str| shard_marker_path(&self.root.child(&up.name), name);
        // The marker this shard's input was published by: the upstream shard's own, or for
        // parts of the input stage the marker of the input file they came from.
        let up_marker = if up.sharded_on(self.job).is_some() {
            shard_marker(id)
        } else if let Some((input_shard, _)) = id.split_once('-')
            && up.tables.iter().any(|t| t == "documents")
        {
            shard_marker(input_shard)
        } else {
            self.root.child(&up.name).path(SUCCESS_MARKER)
        };
        let up_stats = read_json::<StageStats>(&self.root, &up_marker).await?;
        if up_stats
            .as_ref()
            .is_none_or(|s| s.fingerprint != up.fingerprint)
        {
            return job_err!(
                "stage '{}' reads '{}', which has no complete output for shard {id} under {}; run it first (--stages {})",
                plan.name,
                up.name,
                self.root.describe(),
                up.name
            );
        }
        let mut upstream = up_stats.map(|s| s.version()).unwrap_or_default();
        if let Some(near) = near {
            // Clusters span shards: a shard is stale when any part of its input changed.
            upstream = format!("{upstream}+{}", near.version);
        }
        if let Some(done) = read_json::<StageStats>(&self.root, &marker).await?
            && done.fingerprint == plan.fingerprint
            && done.failed() == 0
            && done.upstream == upstream
        {
            return Ok(done);
        }
        let ctx = self.session()?;
        ctx.register_parquet(
            &up.name,
            object_url(&self.root, &up_file),
            ParquetReadOptions::default(),
        )
        .await?;
        if let Some(near) = near {
            ctx.register_table(NEAR_DUPLICATES, near.table.clone())?;
        }
        let mut stats = self
            .execute(&ctx, plan, &out, PartNames::Shard(id.to_string()))
            .await?;
        stats.upstream = upstream;
        write_json(&self.root, &marker, &stats).await?;
        Ok(stats)
    }

    /// Writes the stage's `_SUCCESS` (totals over all shards) once every shard is published.
    async fn publish_if_all_shards(&self, plan: &StagePlan, ids: &[String]) -> Result<()> {
        let dir = self.root.child(&plan.name);
        let mut total = StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            shards: ids.to_vec(),
            ..StageStats::default()
        };
        for id in ids {
            match read_json::<StageStats>(&self.root, &shard_marker_path(&dir, id)).await? {
                Some(s) if s.fingerprint == plan.fingerprint => total.absorb(&s),
                _ => return Ok(()),
            }
        }
        total.shards = ids.to_vec();
        write_json(
            &self.root,
            &self.root.child(&plan.name).path(SUCCESS_MARKER),
            &total,
        )
        .await
    }
}

/// The URL DataFusion reads the object at `path` by.
fn object_url(root: &Location, path: &object_store::path::Path) -> String {
    format!(
        "{}/{}",
        root.store_url.as_str().trim_end_matches('/'),
        path.as_ref()
    )
}

/// Deletes the parts `part-<id>-*.parquet` directly under `dir`.
async fn delete_parts_of(dir: &Location, id: &str) -> Result<()> {
    let listing = dir.store.list_with_delimiter(Some(&dir.prefix)).await?;
    let stem = format!("part-{id}-");
    for meta in listing.objects {
        if meta
            .location
            .filename()
            .is_some_and(|n| n.starts_with(&stem))
        {
            delete_if_exists(dir, &meta.location).await?;
        }
    }
    Ok(())
}

pub(crate) async fn read_parquet_object(
    root: &Location,
    path: &object_store::path::Path,
) -> Result<Vec<RecordBatch>> {
    let bytes = root.store.get(path).await?.bytes().await?;
    let reader =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|e| Error::Execution(format!("reading {}: {e}", root.display(path))))?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Execution(format!("reading {}: {e}", root.display(path))))
}

pub(crate) async fn write_parquet_object(
    root: &Location,
    path: &object_store::path::Path,
    batches: &[RecordBatch],
) -> Result<()> {
    let Some(first) = batches.first() else {
        return Ok(());
    };
    let props = part_properties(&first.schema());
    let bytes = crate::export::parquet_of(batches, first.schema(), Some(props))?;
    root.store.put(path, PutPayload::from(bytes)).await?;
    Ok(())
}

async fn delete_if_exists(root: &Location, path: &object_store::path::Path) -> Result<()> {
    match root.store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    root: &Location,
    path: &object_store::path::Path,
) -> Result<Option<T>> {
    match root.store.get(path).await {
        Ok(got) => {
            let bytes = got.bytes().await?;
            serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::Execution(format!(
                    "{}: unreadable marker ({e}); delete it to redo that work",
                    root.display(path)
                ))
            })
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn write_json<T: Serialize>(
    root: &Location,
    path: &object_store::path::Path,
    value: &T,
) -> Result<()> {
    let body = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Internal(format!("marker serialisation: {e}")))?;
    root.store.put(path, PutPayload::from(body)).await?;
    Ok(())
}

/// Renders a stage's SQL template with the job's settings: `prepare`, `curate`, `params`,
/// `stage` (its `name`, `from` and `vars`) and `functions` (each one's `role` and `model`).
/// The `sql_string` filter quotes a value as a SQL string literal.
pub fn render_sql(job: &Job, stage: &StageSpec) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_filter("sql_string", |value: String| {
        format!("'{}'", value.replace('\'', "''"))
    });
    let mut stage_vars = stage.vars.clone();
    stage_vars.insert("name".into(), stage.name.clone().into());
    if let Some(from) = &stage.from {
        stage_vars.insert("from".into(), from.clone().into());
    }
    let functions: BTreeMap<&str, BTreeMap<&str, &str>> = job
        .functions
        .iter()
        .map(|f| {
            let model = job.models.get(&f.role).map_or("", |m| m.model.as_str());
            (
                f.name.as_str(),
                BTreeMap::from([("role", f.role.as_str()), ("model", model)]),
            )
        })
        .collect();
    let ctx = minijinja::context! {
        prepare => minijinja::Value::from(minijinja::value::Serde(&job.prepare)),
        curate => minijinja::context! { threshold => job.threshold, iteration => job.curate_iteration },
        params => minijinja::Value::from(minijinja::value::Serde(&job.params)),
        stage => minijinja::Value::from(minijinja::value::Serde(&stage_vars)),
        functions => minijinja::Value::from(minijinja::value::Serde(&functions)),
    };
    env.render_str(&stage.sql, ctx)
        .map_err(|e| Error::Job(format!("SQL template of stage '{}': {e}", stage.name)))
}

fn referenced_tables(ctx: &SessionContext, sql: &str, stage: &str) -> Result<Vec<String>> {
    let state = ctx.state();
    let statement = state
        .sql_to_statement(sql, &Dialect::Generic)
        .map_err(|e| Error::Job(format!("SQL of stage '{stage}': {e}")))?;
    Ok(state
        .resolve_table_references(&statement)?
        .into_iter()
        .map(|t| t.table().to_string())
        .collect())
}

/// How a stage names its Parquet files.
#[derive(Debug, Clone)]
enum PartNames {
    /// `part-[PREFIX-]00000.parquet`, `part-[PREFIX-]00001.parquet`, ... of at most `rows`
    /// rows each: the shards later stages work on.
    Numbered {
        /// Names the input shard the parts come from.
        prefix: Option<String>,
        /// Rows per part.
        rows: usize,
    },
    /// One `part-<id>.parquet`: the output of one shard.
    Shard(String),
}

/// Executes `sql` and writes its rows under `out`, dropped rows under `out/_dropped/`;
/// with `first_copies`, repeated texts are dropped too. Returns the counts and the ids of the
/// parts written.
async fn execute_to_parts(
    ctx: SessionContext,
    sql: String,
    tables: Vec<String>,
    out: Location,
    names: PartNames,
    progress: Arc<Progress>,
    mut first_copies: Option<FirstCopies>,
) -> Result<(StageStats, Vec<String>)> {
    let df = ctx.sql(&sql).await?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let mut inherited = Vec::new();
    for table in &tables {
        let input = ctx.table(table.as_str()).await?;
        inherited.extend(input.schema().fields().iter().map(|f| f.name().clone()));
    }
    let drop_index = schema.index_of(DROP_COLUMN).ok();
    let key_index = schema.index_of(DEDUP_KEY_COLUMN).ok();
    let position_indexes = ["file", "line", "ordinal"].map(|c| schema.index_of(c).ok());
    if first_copies.is_some() && (drop_index.is_none() || key_index.is_none()) {
        return Err(Error::Job(format!(
            "the input stage's SQL must return a `{DROP_COLUMN}` column (NULL to keep a row) and \
             a `{DEDUP_KEY_COLUMN}` column for exact dedup"
        )));
    }
    let kept_schema = match drop_index {
        Some(i) => Arc::new(schema.project(&kept_columns(schema.fields().len(), i))?),
        None => Arc::clone(&schema),
    };
    let dropped_schema = drop_index.map(|i| {
        let fields: Vec<Field> = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(j, f)| {
                if j == i {
                    Field::new(DROP_REASON_COLUMN, DataType::Utf8, true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect();
        Arc::new(Schema::new(fields))
    });
    let mut kept = PartWriter::new(out.clone(), kept_schema, names.clone());
    let mut dropped = dropped_schema.map(|s| PartWriter::new(out.child("_dropped"), s, names));
    let mut stats = StageStats::default();
    let plan = df.create_physical_plan().await?;
    tracing::debug!(
        plan = %datafusion::physical_plan::displayable(plan.as_ref()).indent(true),
        "Physical plan."
    );
    let mut stream = on_worker(datafusion::physical_plan::execute_stream(
        plan,
        ctx.task_ctx(),
    )?);
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        stats.rows_in += batch.num_rows() as u64;
        progress.rows.fetch_add(
            batch.num_rows() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        stats.llm = stats.llm.plus(&usage_of_calls(&batch, &inherited));
        let Some(i) = drop_index else {
            stats.rows_out += batch.num_rows() as u64;
            kept.write(&batch).await?;
            continue;
        };
        let mut reasons = cast(batch.column(i), &DataType::Utf8)?;
        if let (Some(first), Some(k)) = (first_copies.as_mut(), key_index) {
            let positions = match position_indexes {
                [Some(f), Some(l), Some(o)] => Some([f, l, o].map(|c| batch.column(c))),
                _ => None,
            };
            reasons = first.mark(batch.column(k), reasons, positions)?;
        }
        let keep: BooleanArray = is_null(&reasons)?;
        let kept_batch = filter_record_batch(
            &batch.project(&kept_columns(batch.num_columns(), i))?,
            &keep,
        )?;
        stats.rows_out += kept_batch.num_rows() as u64;
        kept.write(&kept_batch).await?;
        if keep.true_count() < batch.num_rows() {
            for reason in reasons.as_string::<i32>().iter().flatten() {
                *stats.dropped.entry(reason.to_string()).or_default() += 1;
            }
            let not_keep = datafusion::arrow::compute::not(&keep)?;
            let mut columns = batch.columns().to_vec();
            columns[i] = reasons;
            let writer = dropped
                .as_mut()
                .expect("dropped writer exists with a drop column");
            let dropped_batch = RecordBatch::try_new(Arc::clone(writer.schema()), columns)?;
            writer
                .write(&filter_record_batch(&dropped_batch, &not_keep)?)
                .await?;
        }
    }
    let parts = kept.finish().await?;
    if let Some(d) = dropped {
        d.finish().await?;
    }
    Ok((stats, parts))
}

/// Drives `stream` in a task of its own. A plan of one partition has no exchange, so all its
/// operators run inside the consumer's `poll_next`: without this, input shards polled side by
/// side from one task all ran on one thread.
fn on_worker(
    mut stream: datafusion::execution::SendableRecordBatchStream,
) -> datafusion::execution::SendableRecordBatchStream {
    let mut builder = RecordBatchReceiverStreamBuilder::new(stream.schema(), 2);
    let tx = builder.tx();
    builder.spawn(async move {
        while let Some(batch) = stream.next().await {
            if tx.send(batch).await.is_err() {
                break; // the consumer stopped
            }
        }
        Ok(())
    });
    builder.build()
}

fn kept_columns(n: usize, drop_index: usize) -> Vec<usize> {
    (0..n).filter(|&j| j != drop_index).collect()
}

/// Writes a stage's rows as Parquet parts named by [`PartNames`]. Each part is one object,
/// visible only once complete; a stage or shard with no rows still gets one (empty) part, so
/// its table has a schema.
struct PartWriter {
    dir: Location,
    schema: SchemaRef,
    names: PartNames,
    current: Option<(AsyncArrowWriter<BufWriter>, usize)>,
    written: Vec<String>,
}

/// How parts are written: zstd at [`PART_ZSTD_LEVEL`], row groups of 64 Ki rows; columns of
/// hash values (`minhash` signatures, `dedup_key`) and of values unique per row (`text`, `id`,
/// `doc_id`) skip dictionary encoding, which never pays off there: the writer hashed every
/// value until its dictionary overflowed, then compressed that dictionary too (6% of default
/// prepare's CPU, and the parts came out larger). Signatures are stored uncompressed, since
/// zstd cannot shrink them.
fn part_properties(schema: &Schema) -> WriterProperties {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(PART_ZSTD_LEVEL).expect("valid level"),
        ))
        .set_max_row_group_row_count(Some(64 * 1024));
    if let Ok(field) = schema.field_with_name("minhash")
        && let DataType::List(item) = field.data_type()
    {
        let path = ColumnPath::new(vec!["minhash".into(), "list".into(), item.name().clone()]);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_compression(path, Compression::UNCOMPRESSED);
    }
    for unique in [DEDUP_KEY_COLUMN, "text", "id", "doc_id"] {
        if schema.field_with_name(unique).is_ok() {
            props = props.set_column_dictionary_enabled(ColumnPath::from(unique), false);
        }
    }
    props.build()
}

impl PartWriter {
    fn new(dir: Location, schema: SchemaRef, names: PartNames) -> Self {
        Self {
            dir,
            schema,
            names,
            current: None,
            written: Vec::new(),
        }
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn open(&mut self) -> Result<()> {
        let id = match &self.names {
            PartNames::Numbered { prefix: None, .. } => format!("{:05}", self.written.len()),
            PartNames::Numbered {
                prefix: Some(prefix),
                ..
            } => format!("{prefix}-{:04}", self.written.len()),
            PartNames::Shard(id) => id.clone(),
        };
        let path = self.dir.path(&format!("part-{id}.parquet"));
        self.written.push(id);
        // Streams to the store: multipart upload once the buffer fills, a single PUT otherwise.
        let sink = BufWriter::new(Arc::clone(&self.dir.store), path);
        let props = part_properties(&self.schema);
        let writer = AsyncArrowWriter::try_new(sink, Arc::clone(&self.schema), Some(props))
            .map_err(|e| Error::Execution(format!("opening a Parquet writer: {e}")))?;
        self.current = Some((writer, 0));
        Ok(())
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), batch.columns().to_vec())?;
        let mut offset = 0;
        while offset < batch.num_rows() {
            if self.current.is_none() {
                self.open()?;
            }
            let limit = match self.names {
                PartNames::Numbered { rows, .. } => rows,
                PartNames::Shard(_) => usize::MAX,
            };
            let (writer, rows) = self.current.as_mut().expect("opened above");
            let take = (limit - *rows).min(batch.num_rows() - offset);
            writer
                .write(&batch.slice(offset, take))
                .await
                .map_err(|e| Error::Execution(format!("writing Parquet: {e}")))?;
            *rows += take;
            offset += take;
            if *rows >= limit {
                self.close_current().await?;
            }
        }
        Ok(())
    }

    async fn close_current(&mut self) -> Result<()> {
        if let Some((writer, _)) = self.current.take() {
            writer
                .close()
                .await
                .map_err(|e| Error::Execution(format!("closing Parquet: {e}")))?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<Vec<String>> {
        if self.written.is_empty() {
            self.open()?;
        }
        self.close_current().await?;
        Ok(self.written)
    }
}

/// Fails when `root` holds no complete stage at all.
pub async fn require_any_stage(root: &Location) -> Result<Vec<String>> {
    let stages = complete_stages_under(root).await?;
    if stages.is_empty() {
        return exec_err!(
            "{} holds no complete stage output; run `backforth run JOB` first",
            root.describe()
        );
    }
    Ok(stages)
}

/// A stage's output schema as documented in `schemas/`: logical types (`string` for every
/// string encoding), nullability, and nested fields.
pub fn schema_doc(schema: &Schema) -> serde_json::Value {
    serde_json::Value::Array(schema.fields().iter().map(|f| field_doc(f)).collect())
}

fn field_doc(field: &Field) -> serde_json::Value {
    serde_json::json!({
        "name": field.name(),
        "type": type_doc(field.data_type()),
        "nullable": field.is_nullable(),
    })
}

fn type_doc(t: &DataType) -> serde_json::Value {
    use serde_json::json;
    match t {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => json!("string"),
        DataType::Struct(fields) => {
            json!({"struct": fields.iter().map(|f| field_doc(f)).collect::<Vec<_>>()})
        }
        DataType::List(item) | DataType::LargeList(item) => {
            json!({"list": type_doc(item.data_type())})
        }
        other => json!(other.to_string().to_lowercase()),
    }
}
