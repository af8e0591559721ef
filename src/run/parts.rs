//! A stage's rows written as Parquet parts: kept rows under the stage, dropped rows under
//! `_dropped/` with their reason, LLM usage counted from the call structs on the way.

use std::sync::Arc;

use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::{cast, filter_record_batch, is_null};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::parquet::arrow::AsyncArrowWriter;
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use object_store::buffered::BufWriter;

use crate::engine::llm_function::call_structs;
use crate::error::{Context, Error, Result};
use crate::llm::reply::Usage;
use crate::root::marker::StageStats;
use crate::root::names::{
    DEDUP_KEY_COLUMN, DROP_COLUMN, DROP_REASON_COLUMN, DROPPED_DIR, PartNames, part_file,
};
use crate::root::objects::part_properties;
use crate::run::exact_dedup::FirstCopies;
use crate::run::progress::Progress;
use crate::storage::{Location, sync_local};

/// What a stage's SQL may be: a query. `COPY ... TO`, `CREATE`, `INSERT` and `SET` would let
/// a shared job's SQL write files or change the session.
pub(crate) fn query_only() -> datafusion::execution::context::SQLOptions {
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// LLM usage read from the call structs of a batch: requests actually sent, calls answered
/// from the journal or shared, failures and tokens paid for.
fn usage_of_calls(batch: &RecordBatch, inherited: &[String]) -> Usage {
    use datafusion::arrow::array::{
        Array, BooleanArray as B, Float64Array, Int32Array, Int64Array,
    };
    let mut usage = Usage::default();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        // Calls carried over from an earlier stage were paid for there.
        if inherited.contains(field.name()) {
            continue;
        }
        let Some((calls, rows)) = call_structs(column) else {
            continue;
        };
        let attempts: &Int32Array = reply_field(calls, "attempts");
        let cached: &B = reply_field(calls, "cached");
        let error = calls.column_by_name("error").expect("reply field");
        let prompt: &Int64Array = reply_field(calls, "prompt_tokens");
        let completion: &Int64Array = reply_field(calls, "completion_tokens");
        let cost: &Float64Array = reply_field(calls, "cost_usd");
        let reasoning: &Int64Array = reply_field(calls, "reasoning_tokens");
        let cached_tokens: &Int64Array = reply_field(calls, "cached_tokens");
        for i in rows {
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
            usage.reasoning_tokens += reasoning.value(i).max(0) as u64;
            usage.cached_tokens += cached_tokens.value(i).max(0) as u64;
        }
    }
    usage
}

/// The field `name` of a column of call structs, as the array type the reply declares.
fn reply_field<'a, T: 'static>(
    calls: &'a datafusion::arrow::array::StructArray,
    name: &str,
) -> &'a T {
    calls
        .column_by_name(name)
        .and_then(|column| column.as_any().downcast_ref::<T>())
        .expect("a reply field of its declared type")
}

/// Executes `sql` and writes its rows under `out`, dropped rows under `out/_dropped/`;
/// with `first_copies`, repeated texts are dropped too. Returns the counts and the ids of the
/// parts written.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site, which hands over a stage's plan as it is"
)]
pub(super) async fn execute_to_parts(
    ctx: SessionContext,
    sql: String,
    tables: Vec<String>,
    out: Location,
    names: PartNames,
    progress: Arc<Progress>,
    mut first_copies: Option<FirstCopies>,
    fsync: bool,
) -> Result<(StageStats, Vec<String>)> {
    let df = ctx.sql_with_options(&sql, query_only()).await?;
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
    let (kept_schema, dropped_schema) = output_schemas(&schema, drop_index)?;
    let mut kept = PartWriter::new(out.clone(), kept_schema, names.clone());
    let mut dropped = dropped_schema.map(|s| PartWriter::new(out.child(DROPPED_DIR), s, names));
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
    let dropped_parts = match dropped {
        Some(d) => d.finish().await?,
        None => Vec::new(),
    };
    if fsync {
        let files = |ids: &[String]| ids.iter().map(|id| part_file(id)).collect::<Vec<_>>();
        sync_local(&out, &files(&parts))?;
        if !dropped_parts.is_empty() {
            sync_local(&out.child(DROPPED_DIR), &files(&dropped_parts))?;
        }
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

/// The schemas of the kept rows (without the drop column) and of the dropped rows (the drop
/// column as `drop_reason`), for a stage whose SQL returns `schema`.
fn output_schemas(
    schema: &SchemaRef,
    drop_index: Option<usize>,
) -> Result<(SchemaRef, Option<SchemaRef>)> {
    let Some(i) = drop_index else {
        return Ok((Arc::clone(schema), None));
    };
    let kept = Arc::new(schema.project(&kept_columns(schema.fields().len(), i))?);
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
    Ok((kept, Some(Arc::new(Schema::new(fields)))))
}

fn kept_columns(n: usize, drop_index: usize) -> Vec<usize> {
    (0..n).filter(|&j| j != drop_index).collect()
}

/// Rows a part writer holds as Arrow before it encodes them as one row group. An open row
/// group keeps two zstd contexts and a dictionary per column (about 2 MB for a stage's twenty
/// columns), and an LLM stage's rows come as slowly as its replies: so rows are kept as they
/// came and encoded at once, when this much has come or the shard ends, and the row group is
/// closed straight after.
const BUFFERED_BYTES: usize = 8 << 20;

/// Writes a stage's rows as Parquet parts named by [`PartNames`]. Each part is one object,
/// visible only once complete; a stage or shard with no rows still gets one (empty) part, so
/// its table has a schema.
struct PartWriter {
    dir: Location,
    schema: SchemaRef,
    names: PartNames,
    current: Option<(AsyncArrowWriter<BufWriter>, usize)>,
    written: Vec<String>,
    /// Rows not yet given to a Parquet writer, and their Arrow size.
    buffered: Vec<RecordBatch>,
    buffered_bytes: usize,
}

impl PartWriter {
    fn new(dir: Location, schema: SchemaRef, names: PartNames) -> Self {
        Self {
            dir,
            schema,
            names,
            current: None,
            written: Vec::new(),
            buffered: Vec::new(),
            buffered_bytes: 0,
        }
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn open(&mut self) -> Result<()> {
        let id = self.names.id(self.written.len());
        let path = self.dir.path(&part_file(&id));
        self.written.push(id);
        // Streams to the store: multipart upload once the buffer fills, a single PUT otherwise.
        let sink = BufWriter::new(Arc::clone(&self.dir.store), path);
        let props = part_properties(&self.schema);
        let writer = AsyncArrowWriter::try_new(sink, Arc::clone(&self.schema), Some(props))
            .with_context(|| format!("opening a Parquet writer"))?;
        self.current = Some((writer, 0));
        Ok(())
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), batch.columns().to_vec())?;
        self.buffered_bytes += batch.get_array_memory_size();
        self.buffered.push(batch);
        if self.buffered_bytes < BUFFERED_BYTES {
            return Ok(());
        }
        self.write_buffered().await
    }

    /// Encodes the rows kept so far and closes their row group.
    async fn write_buffered(&mut self) -> Result<()> {
        self.buffered_bytes = 0;
        for batch in std::mem::take(&mut self.buffered) {
            self.encode(&batch).await?;
        }
        if let Some((writer, _)) = self.current.as_mut() {
            writer
                .flush()
                .await
                .with_context(|| format!("writing a Parquet row group"))?;
        }
        Ok(())
    }

    async fn encode(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            if self.current.is_none() {
                self.open()?;
            }
            let limit = self.names.rows_per_part();
            let (writer, rows) = self.current.as_mut().expect("opened above");
            let take = (limit - *rows).min(batch.num_rows() - offset);
            writer
                .write(&batch.slice(offset, take))
                .await
                .with_context(|| format!("writing Parquet"))?;
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
                .with_context(|| format!("closing Parquet"))?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<Vec<String>> {
        self.write_buffered().await?;
        if self.written.is_empty() {
            self.open()?;
        }
        self.close_current().await?;
        Ok(self.written)
    }
}
