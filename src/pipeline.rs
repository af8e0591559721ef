//! Running a job: one DataFusion session, stages as SQL over named tables, each stage's result
//! streamed to Parquet under `<output>/<stage>/` and marked complete last.
//!
//! A stage's SQL may return a `_drop` column: rows where it is NULL are the stage's output,
//! the others go to `<stage>/_dropped/` with the reason in `drop_reason`, and every reason is
//! counted in the stage's `_SUCCESS` marker. So every row that entered a stage is either in
//! its output or in a counted drop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::{cast, filter_record_batch, is_null};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::config::Dialect;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::parquet::arrow::AsyncArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use futures::StreamExt;
use object_store::buffered::BufWriter;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::exec::{LlmWindowRule, Window};
use crate::ingest::{IngestCounts, IngestStats, documents_table};
use crate::job::Job;
use crate::llm::{LlmPool, Usage};
use crate::storage::{Location, list_inputs};
use crate::tokens::TokenCounter;
use crate::{exec_err, job_err, udf};

/// Name of the marker a complete stage output carries; it holds the stage's [`StageStats`].
pub const SUCCESS_MARKER: &str = "_SUCCESS";
/// Column a stage's SQL uses to drop a row with a reason.
pub const DROP_COLUMN: &str = "_drop";
/// Column holding the drop reason in `<stage>/_dropped/`.
pub const DROP_REASON_COLUMN: &str = "drop_reason";

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
    let path = root.child(stage).path(SUCCESS_MARKER);
    match root.store.get(&path).await {
        Ok(got) => {
            let bytes = got.bytes().await?;
            let stats = serde_json::from_slice(&bytes).map_err(|e| {
                Error::Execution(format!(
                    "{}: unreadable marker ({e}); rerun stage '{stage}'",
                    root.display(&path)
                ))
            })?;
            Ok(Some(stats))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
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
        self.stages
            .iter()
            .map(|s| s.dropped.get("llm_error").copied().unwrap_or(0))
            .sum()
    }
}

/// Runs `selected` stages of `job` (all when empty), in job order.
pub async fn run(job: &Job, selected: &[String]) -> Result<RunSummary> {
    let to_run = job.select_stages(selected)?;
    let root = Location::parse(&job.output)?;
    let pool = Arc::new(LlmPool::new(job.models.values()));
    let window = Window::for_cap(pool.max_concurrency());
    let ctx = new_session(job.execution.target_partitions, window)?;
    register_store(&ctx, &root);
    let tokens = TokenCounter::load(&job.prepare.tokenizer, &job.base_dir)?;
    let functions: Vec<_> = job
        .functions
        .iter()
        .map(|f| {
            let client = pool
                .model(&f.role)
                .cloned()
                .ok_or_else(|| Error::Internal(format!("no client for role {}", f.role)))?;
            Ok((f.clone(), client))
        })
        .collect::<Result<_>>()?;
    udf::register_all(&ctx, &functions, tokens)?;

    let earlier: Vec<String> = job
        .stages
        .iter()
        .map(|s| s.name.clone())
        .filter(|s| !to_run.contains(s))
        .collect();
    register_complete_stages(&ctx, &root, earlier).await?;

    let ingest = Arc::new(IngestStats::default());
    let mut summary = RunSummary::default();
    for stage in job.stages.iter().filter(|s| to_run.contains(&s.name)) {
        let sql = render_sql(job, &stage.sql, &stage.name)?;
        let tables = referenced_tables(&ctx, &sql, &stage.name)?;
        for table in &tables {
            if table == "documents" {
                if ctx.table_exist("documents")? {
                    continue;
                }
                let mut files = Vec::new();
                for input in &job.inputs {
                    files.extend(list_inputs(input).await?);
                }
                ctx.register_table(
                    "documents",
                    Arc::new(documents_table(
                        files,
                        job.on_bad_line,
                        Arc::clone(&ingest),
                    )?),
                )?;
            } else if !ctx.table_exist(table.as_str())? {
                let known = job.stages.iter().any(|s| &s.name == table);
                return if known {
                    job_err!(
                        "stage '{}' reads '{table}', which has no complete output under {}; run it first (--stages {table})",
                        stage.name,
                        root.dir_url()
                    )
                } else {
                    job_err!(
                        "stage '{}' reads table '{table}', which is neither 'documents' nor a stage of this job",
                        stage.name
                    )
                };
            }
        }
        let before = pool.usage();
        let started = Instant::now();
        tracing::info!(stage = %stage.name, "Stage started.");
        let mut stats =
            run_stage(&ctx, &root, &stage.name, &sql, job.execution.rows_per_file).await?;
        stats.llm = pool.usage().since(&before);
        stats.seconds = started.elapsed().as_secs_f64();
        if tables.iter().any(|t| t == "documents") {
            stats.input = Some(ingest.snapshot());
        }
        write_marker(&root, &stats).await?;
        register_stage_table(&ctx, &root, &stage.name).await?;
        tracing::info!(
            stage = %stage.name,
            rows_in = stats.rows_in,
            rows_out = stats.rows_out,
            requests = stats.llm.requests,
            seconds = format!("{:.1}", stats.seconds),
            "Stage complete."
        );
        summary.stages.push(stats);
    }
    Ok(summary)
}

/// Renders a stage's SQL template with the job's settings.
pub fn render_sql(job: &Job, template: &str, stage: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    let ctx = minijinja::context! {
        prepare => minijinja::Value::from(minijinja::value::Serde(&job.prepare)),
        curate => minijinja::context! { threshold => job.threshold },
        params => minijinja::Value::from(minijinja::value::Serde(&job.params)),
    };
    env.render_str(template, ctx)
        .map_err(|e| Error::Job(format!("SQL template of stage '{stage}': {e}")))
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

/// Executes `sql` and writes its rows to `<root>/<stage>/`, dropped rows to `_dropped/`.
async fn run_stage(
    ctx: &SessionContext,
    root: &Location,
    stage: &str,
    sql: &str,
    rows_per_file: Option<usize>,
) -> Result<StageStats> {
    let out = root.child(stage);
    // A rerun replaces the stage: the marker goes first, so a crash leaves it incomplete.
    match root.store.delete(&out.path(SUCCESS_MARKER)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    out.delete_all().await?;
    let df = ctx.sql(sql).await?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let drop_index = schema.index_of(DROP_COLUMN).ok();
    let kept_schema = match drop_index {
        Some(i) => Arc::new(
            schema.project(
                &(0..schema.fields().len())
                    .filter(|&j| j != i)
                    .collect::<Vec<_>>(),
            )?,
        ),
        None => Arc::clone(&schema),
    };
    let dropped_schema = match drop_index {
        Some(i) => {
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
            Some(Arc::new(Schema::new(fields)))
        }
        None => None,
    };
    let rows_per_file = rows_per_file.unwrap_or(1_000_000).max(1);
    let mut kept = PartWriter::new(out.clone(), kept_schema, rows_per_file);
    let mut dropped =
        dropped_schema.map(|s| PartWriter::new(out.child("_dropped"), s, rows_per_file));
    let mut stats = StageStats {
        stage: stage.to_string(),
        ..StageStats::default()
    };
    let plan = df.create_physical_plan().await?;
    tracing::debug!(
        stage,
        plan = %datafusion::physical_plan::displayable(plan.as_ref()).indent(true),
        "Physical plan."
    );
    let mut stream = datafusion::physical_plan::execute_stream(plan, ctx.task_ctx())?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        stats.rows_in += batch.num_rows() as u64;
        let Some(i) = drop_index else {
            stats.rows_out += batch.num_rows() as u64;
            kept.write(&batch).await?;
            continue;
        };
        let reasons = cast(batch.column(i), &DataType::Utf8)?;
        let keep: BooleanArray = is_null(&reasons)?;
        let kept_batch = filter_record_batch(&batch.project(&kept_columns(&batch, i))?, &keep)?;
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
    kept.finish().await?;
    if let Some(d) = dropped {
        d.finish().await?;
    }
    Ok(stats)
}

fn kept_columns(batch: &RecordBatch, drop_index: usize) -> Vec<usize> {
    (0..batch.num_columns())
        .filter(|&j| j != drop_index)
        .collect()
}

async fn write_marker(root: &Location, stats: &StageStats) -> Result<()> {
    let path = root.child(&stats.stage).path(SUCCESS_MARKER);
    let body = serde_json::to_vec_pretty(stats)
        .map_err(|e| Error::Internal(format!("stats serialisation: {e}")))?;
    root.store.put(&path, PutPayload::from(body)).await?;
    Ok(())
}

/// Writes a stage's rows as `part-NNNNN.parquet` files of at most `rows_per_file` rows.
/// A stage with no rows still gets one (empty) file, so its table has a schema.
struct PartWriter {
    dir: Location,
    schema: SchemaRef,
    rows_per_file: usize,
    current: Option<(AsyncArrowWriter<BufWriter>, usize)>,
    parts: usize,
}

impl PartWriter {
    fn new(dir: Location, schema: SchemaRef, rows_per_file: usize) -> Self {
        Self {
            dir,
            schema,
            rows_per_file,
            current: None,
            parts: 0,
        }
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn open(&mut self) -> Result<()> {
        let path = self.dir.path(&format!("part-{:05}.parquet", self.parts));
        self.parts += 1;
        // Streams to the store: multipart upload once the buffer fills, a single PUT otherwise.
        let sink = BufWriter::new(Arc::clone(&self.dir.store), path);
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(3).expect("valid level"),
            ))
            .set_max_row_group_row_count(Some(64 * 1024))
            .build();
        let writer = AsyncArrowWriter::try_new(sink, Arc::clone(&self.schema), Some(props))
            .map_err(|e| Error::Execution(format!("opening a Parquet writer: {e}")))?;
        self.current = Some((writer, 0));
        Ok(())
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.current.is_none() {
            self.open()?;
        }
        let (writer, rows) = self.current.as_mut().expect("opened above");
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), batch.columns().to_vec())?;
        writer
            .write(&batch)
            .await
            .map_err(|e| Error::Execution(format!("writing Parquet: {e}")))?;
        *rows += batch.num_rows();
        if *rows >= self.rows_per_file {
            let (writer, _) = self.current.take().expect("present");
            writer
                .close()
                .await
                .map_err(|e| Error::Execution(format!("closing Parquet: {e}")))?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<()> {
        if self.current.is_none() && self.parts == 0 {
            self.open()?;
        }
        if let Some((writer, _)) = self.current.take() {
            writer
                .close()
                .await
                .map_err(|e| Error::Execution(format!("closing Parquet: {e}")))?;
        }
        Ok(())
    }
}

/// Fails when `root` holds no complete stage at all.
pub async fn require_any_stage(root: &Location) -> Result<Vec<String>> {
    let stages = complete_stages_under(root).await?;
    if stages.is_empty() {
        return exec_err!(
            "{} holds no complete stage output; run `backforth run JOB` first",
            root.dir_url()
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
