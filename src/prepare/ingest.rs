//! Dolma-style documents (`id`, `text`, `source`, `added`, `created`, `metadata`) from JSONL
//! (plain, gzip, zstd) and Parquet, decoded as each file is read, never downloaded whole.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, ArrayRef, Int64Builder, RecordBatch, StringArray, StringBuilder,
};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::error::DataFusionError;
#[expect(
    deprecated,
    reason = "parquet 59's only object_store reader; revisit with arrow 60"
)]
use datafusion::parquet::arrow::async_reader::ParquetObjectReader;
use datafusion::parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use datafusion::parquet::errors::ParquetError;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use serde_json::Value;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::error::Error;
use crate::storage::{InputFile, InputFormat};

/// What to do with a malformed input line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadLinePolicy {
    /// Stop the run with an error naming file and line.
    #[default]
    Error,
    /// Skip the line and count it as a drop of the `candidates` stage.
    Skip,
}

/// How input lines are read: what a bad line does, and how long a line may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRules {
    /// What to do with a malformed line.
    pub on_bad_line: BadLinePolicy,
    /// Longest line read, in bytes; a longer one is a bad line, never held whole.
    pub max_line_bytes: usize,
    /// Largest Parquet row group decoded (its document columns, uncompressed), in bytes.
    pub max_row_group_bytes: u64,
}

/// The default largest row group: a few of them decoded at once must fit in memory.
pub const MAX_ROW_GROUP_BYTES: u64 = 2 << 30;

/// The default longest line: far beyond any web document, far below what fills memory.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// The fields of a document read from a Parquet input; other columns are never decoded.
const DOCUMENT_FIELDS: [&str; 6] = ["id", "text", "source", "added", "created", "metadata"];

/// Rows per batch built from JSON lines.
const BATCH_ROWS: usize = 4096;

/// Schema of the `documents` table.
pub fn documents_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        // Nullable only so Parquet rows can be checked before they are filtered.
        Field::new("text", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, true),
        Field::new("added", DataType::Utf8, true),
        Field::new("created", DataType::Utf8, true),
        Field::new("metadata", DataType::Utf8, true),
        Field::new("file", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
    ]))
}

/// What ingest read and what it skipped, shared by every file's partition.
#[derive(Debug, Default)]
pub struct IngestStats {
    inner: Mutex<IngestCounts>,
}

/// Counts of documents read and lines skipped (by reason).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IngestCounts {
    /// Documents read.
    pub documents: u64,
    /// Malformed lines skipped under `on_bad_line = "skip"`, by reason.
    pub skipped: BTreeMap<String, u64>,
}

impl IngestStats {
    fn add_documents(&self, n: u64) {
        self.inner.lock().expect("lock poisoned").documents += n;
    }

    fn add_skip(&self, reason: &str) {
        *self
            .inner
            .lock()
            .expect("lock poisoned")
            .skipped
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// A copy of the counts so far.
    pub fn snapshot(&self) -> IngestCounts {
        self.inner.lock().expect("lock poisoned").clone()
    }
}

/// The documents of `file` as a stream of batches of the `documents` schema, decoded as the
/// file is read.
pub fn document_batches(file: InputFile, rules: ReadRules, stats: Arc<IngestStats>) -> BatchStream {
    match file.format {
        InputFormat::Parquet => parquet_stream(file, rules, stats),
        _ => jsonl_stream(file, rules, stats),
    }
}

/// Input files decoded at once. Each holds a blocking thread for as long as it is read, and
/// must leave enough of them for the object store calls that consume its batches.
pub const DECODERS_AT_ONCE: usize = 8;

/// Batches of documents as they are decoded.
pub type BatchStream = futures::stream::BoxStream<'static, datafusion::error::Result<RecordBatch>>;

fn jsonl_stream(file: InputFile, rules: ReadRules, stats: Arc<IngestStats>) -> BatchStream {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let handle = tokio::runtime::Handle::current();
    // The object is opened on the runtime: opening a local file takes a blocking thread of
    // its own, which a reader already holding one must not wait for (the blocking pool is
    // capped). Decompression and JSON parsing are blocking CPU work: they run on a blocking
    // thread that reads the object as a byte stream and sends batches back.
    tokio::spawn(async move {
        let opened = file.store.get(&file.path).await;
        tokio::task::spawn_blocking(move || {
            // Denied, gone, unreachable: say which input, as the user named it.
            let result = opened
                .map_err(|e| Error::failed(format!("reading input '{}'", file.display), e))
                .and_then(|get| read_jsonl(&handle, &file, get, rules, &stats, &tx));
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(DataFusionError::from(e)));
            }
        });
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<datafusion::error::Result<RecordBatch>>,
) -> BatchStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

fn read_jsonl(
    handle: &tokio::runtime::Handle,
    file: &InputFile,
    get: object_store::GetResult,
    rules: ReadRules,
    stats: &IngestStats,
    tx: &tokio::sync::mpsc::Sender<datafusion::error::Result<RecordBatch>>,
) -> Result<(), Error> {
    let policy = rules.on_bad_line;
    let raw: Box<dyn Read> = match get.payload {
        // A local file is read here, on this blocking thread: its byte stream would hand over
        // every 8 KiB chunk from a blocking task of its own.
        object_store::GetResultPayload::File(mut local, _) => {
            use std::io::{Seek, SeekFrom};
            local
                .seek(SeekFrom::Start(get.range.start))
                .map_err(|e| Error::Input {
                    file: file.display.clone(),
                    line: 0,
                    message: format!("cannot read: {e}"),
                })?;
            Box::new(local.take(get.range.end - get.range.start))
        }
        object_store::GetResultPayload::Stream(bytes) => {
            let bytes = bytes.map_err(|e| std::io::Error::other(e.to_string()));
            Box::new(SyncIoBridge::new_with_handle(
                StreamReader::new(bytes),
                handle.clone(),
            ))
        }
    };
    let decoded: Box<dyn Read> = match file.format {
        InputFormat::JsonlGzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(raw))),
        InputFormat::JsonlZstd => {
            Box::new(
                zstd::stream::read::Decoder::new(raw).map_err(|e| Error::Input {
                    file: file.display.clone(),
                    line: 0,
                    message: format!("not a zstd stream ({e}); check the file's extension"),
                })?,
            )
        }
        _ => Box::new(raw),
    };
    let mut reader = BufReader::with_capacity(1 << 20, decoded);
    let mut batch = DocBatch::new(&file.display, &file.key);
    let mut split_line = Vec::new();
    let mut line_no = 0u64;
    let cannot_read = |line: u64, e: std::io::Error| Error::Input {
        file: file.display.clone(),
        line,
        message: format!("cannot read or decompress: {e}"),
    };
    loop {
        let chunk = reader.fill_buf().map_err(|e| cannot_read(line_no + 1, e))?;
        if chunk.is_empty() {
            break;
        }
        line_no += 1;
        // A line inside the read buffer is parsed where it is; only one that straddles the
        // buffer's end is copied out.
        let flow = match memchr::memchr(b'\n', chunk) {
            Some(end) => {
                let flow = take_line(&chunk[..end], line_no, &mut batch, policy, stats, tx, file);
                reader.consume(end + 1);
                flow
            }
            None => {
                split_line.clear();
                let fits = read_capped_line(&mut reader, &mut split_line, rules.max_line_bytes)
                    .map_err(|e| cannot_read(line_no, e))?;
                if fits {
                    take_line(&split_line, line_no, &mut batch, policy, stats, tx, file)
                } else {
                    too_long(line_no, rules, stats, file).map(|()| true)
                }
            }
        };
        if !flow? {
            return Ok(()); // the query was cancelled
        }
    }
    if batch.len() > 0 {
        stats.add_documents(batch.len() as u64);
        let _ = tx.blocking_send(Ok(batch.finish()));
    }
    Ok(())
}

/// Reads one line (with its `\n`) into `out`, unless it is longer than `cap`: then the rest
/// of it is skipped without being held, `out` is left empty and false returned.
pub fn read_capped_line(
    reader: &mut impl BufRead,
    out: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<bool> {
    let mut line = CappedLine::new(cap);
    loop {
        let chunk = reader.fill_buf()?;
        let (taken, done) = line.take(chunk, out);
        reader.consume(taken);
        if done {
            return Ok(line.fits);
        }
    }
}

/// One line being read chunk by chunk, up to a cap, from a sync or an async reader.
#[derive(Debug)]
pub struct CappedLine {
    cap: usize,
    /// False once the line has passed the cap (what was read of it is dropped).
    pub fits: bool,
}

impl CappedLine {
    /// A line of at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self { cap, fits: true }
    }

    /// Takes from `chunk` (an empty one: the end of the input) what belongs to the line into
    /// `out`; returns how many bytes were taken and whether the line is complete.
    pub fn take(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        if chunk.is_empty() {
            return (0, true);
        }
        let (taken, done) = match memchr::memchr(b'\n', chunk) {
            Some(end) => (end + 1, true),
            None => (chunk.len(), false),
        };
        if self.fits && out.len() + taken <= self.cap.saturating_add(1) {
            out.extend_from_slice(&chunk[..taken]);
        } else {
            self.fits = false;
            out.clear();
        }
        (taken, done)
    }
}

/// A line longer than the rules allow: counted and skipped, or the error naming it.
fn too_long(
    line_no: u64,
    rules: ReadRules,
    stats: &IngestStats,
    file: &InputFile,
) -> Result<(), Error> {
    match rules.on_bad_line {
        BadLinePolicy::Skip => {
            stats.add_skip("line_too_long");
            Ok(())
        }
        BadLinePolicy::Error => Err(Error::Input {
            file: file.display.clone(),
            line: line_no,
            message: format!(
                "the line is longer than {} bytes ([input] max_line_bytes); it was not read. Raise the limit, fix the line, or set [input] on_bad_line = \"skip\"",
                rules.max_line_bytes
            ),
        }),
    }
}

/// Adds one line's document to `batch`, sending the batch when full, or counts the line as
/// bad (or stops, as `policy` says). False once the receiver has gone.
fn take_line(
    line: &[u8],
    line_no: u64,
    batch: &mut DocBatch,
    policy: BadLinePolicy,
    stats: &IngestStats,
    tx: &tokio::sync::mpsc::Sender<datafusion::error::Result<RecordBatch>>,
    file: &InputFile,
) -> Result<bool, Error> {
    match parse_line(line) {
        Ok(None) => {}
        Ok(Some(doc)) => {
            batch.push(doc, line_no);
            if batch.len() >= BATCH_ROWS {
                stats.add_documents(batch.len() as u64);
                return Ok(tx.blocking_send(Ok(batch.finish())).is_ok());
            }
        }
        Err(problem) => match policy {
            BadLinePolicy::Skip => stats.add_skip(problem.reason),
            BadLinePolicy::Error => {
                return Err(Error::Input {
                    file: file.display.clone(),
                    line: line_no,
                    message: format!(
                        "{}; fix the line, or set [input] on_bad_line = \"skip\" to count and skip such lines",
                        problem.message
                    ),
                });
            }
        },
    }
    Ok(true)
}

/// One parsed document line, borrowing from the line where JSON needed no unescaping.
struct Doc<'a> {
    id: Option<Cow<'a, str>>,
    text: Cow<'a, str>,
    source: Option<Cow<'a, str>>,
    added: Option<Cow<'a, str>>,
    created: Option<Cow<'a, str>>,
    metadata: Option<String>,
}

struct LineProblem {
    reason: &'static str,
    message: String,
}

/// A document line whose fields have the usual types, read without building a JSON tree for
/// it: the fast path of [`parse_line`].
#[derive(serde::Deserialize)]
struct PlainLine<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow)]
    added: Option<Cow<'a, str>>,
    #[serde(borrow)]
    created: Option<Cow<'a, str>>,
    metadata: Option<Value>,
}

fn parse_line(bytes: &[u8]) -> Result<Option<Doc<'_>>, LineProblem> {
    let line = std::str::from_utf8(bytes).map_err(|e| LineProblem {
        reason: "invalid_utf8",
        message: format!("not valid UTF-8 ({e})"),
    })?;
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    if let Ok(doc) = serde_json::from_str::<PlainLine>(line) {
        if let Some(text) = doc.text {
            return Ok(Some(Doc {
                id: doc.id,
                text,
                source: doc.source,
                added: doc.added,
                created: doc.created,
                metadata: doc.metadata.filter(|m| !m.is_null()).map(|m| m.to_string()),
            }));
        }
    }
    // Anything unusual (a number for an id, a missing text, not JSON at all) takes the
    // general path, which also words the problem.
    let value: Value = serde_json::from_str(line).map_err(|e| LineProblem {
        reason: "invalid_json",
        message: format!("not valid JSON: {e}"),
    })?;
    let Value::Object(mut obj) = value else {
        return Err(LineProblem {
            reason: "not_an_object",
            message: "a document line must be a JSON object".to_string(),
        });
    };
    let text = match obj.remove("text") {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None => {
            return Err(LineProblem {
                reason: "missing_text",
                message: "column 'text' is missing or null".to_string(),
            });
        }
        Some(other) => {
            return Err(LineProblem {
                reason: "text_not_string",
                message: format!(
                    "column 'text' must be a string, found {}",
                    json_kind(&other)
                ),
            });
        }
    };
    let mut scalar = |name: &str| match obj.remove(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Cow::Owned(s)),
        Some(other) => Some(Cow::Owned(other.to_string())),
    };
    Ok(Some(Doc {
        id: scalar("id"),
        source: scalar("source"),
        added: scalar("added"),
        created: scalar("created"),
        metadata: obj
            .remove("metadata")
            .filter(|m| !m.is_null())
            .map(|m| m.to_string()),
        text: Cow::Owned(text),
    }))
}

/// The kind of a JSON value, as messages name it (`a string`, `an object`, ...).
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct DocBatch {
    file: String,
    /// The file's path under the input root, which derived ids start with.
    key: String,
    doc_id: StringBuilder,
    text: StringBuilder,
    source: StringBuilder,
    added: StringBuilder,
    created: StringBuilder,
    metadata: StringBuilder,
    line: Int64Builder,
    rows: usize,
}

impl DocBatch {
    fn new(file: &str, key: &str) -> Self {
        Self {
            file: file.to_string(),
            key: key.to_string(),
            doc_id: StringBuilder::new(),
            text: StringBuilder::new(),
            source: StringBuilder::new(),
            added: StringBuilder::new(),
            created: StringBuilder::new(),
            metadata: StringBuilder::new(),
            line: Int64Builder::new(),
            rows: 0,
        }
    }

    fn len(&self) -> usize {
        self.rows
    }

    fn push(&mut self, doc: Doc, line: u64) {
        // A document without an id is named by where it came from, which is stable across runs.
        match doc.id {
            Some(id) => self.doc_id.append_value(id),
            None => self.doc_id.append_value(format!("{}:{line}", self.key)),
        }
        self.text.append_value(doc.text);
        self.source.append_option(doc.source);
        self.added.append_option(doc.added);
        self.created.append_option(doc.created);
        self.metadata.append_option(doc.metadata);
        self.line.append_value(line as i64);
        self.rows += 1;
    }

    fn finish(&mut self) -> RecordBatch {
        let rows = std::mem::take(&mut self.rows);
        // The next batch gets room for as much text as this one had: growing a builder by
        // doubling copied every batch's text several times over.
        let text_bytes = self.text.values_slice().len();
        let mut text = std::mem::replace(
            &mut self.text,
            StringBuilder::with_capacity(BATCH_ROWS, text_bytes + text_bytes / 8),
        );
        let file: StringArray = std::iter::repeat_n(Some(self.file.as_str()), rows).collect();
        RecordBatch::try_new(
            documents_schema(),
            vec![
                Arc::new(self.doc_id.finish()),
                Arc::new(text.finish()),
                Arc::new(self.source.finish()),
                Arc::new(self.added.finish()),
                Arc::new(self.created.finish()),
                Arc::new(self.metadata.finish()),
                Arc::new(file),
                Arc::new(self.line.finish()),
            ],
        )
        .expect("columns match documents_schema")
    }
}

fn parquet_stream(file: InputFile, rules: ReadRules, stats: Arc<IngestStats>) -> BatchStream {
    let policy = rules.on_bad_line;
    let (display, key) = (file.display.clone(), file.key.clone());
    futures::stream::once(async move {
        let builder = parquet_builder(&file).await?;
        // Row numbers in messages count from the start of the file, not of the shard.
        let mut first_row: u64 = match &file.row_groups {
            Some(r) => (0..r.start)
                .map(|i| builder.metadata().row_group(i).num_rows() as u64)
                .sum(),
            None => 0,
        };
        let builder = match &file.row_groups {
            Some(r) => builder.with_row_groups(r.clone().collect()),
            None => builder,
        };
        // Only the columns documents have: a Dolma Parquet may carry raw HTML beside `text`.
        let wanted: Vec<usize> = builder
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| DOCUMENT_FIELDS.contains(&f.name().as_str()))
            .map(|(i, _)| i)
            .collect();
        check_row_groups(
            builder.metadata(),
            &file,
            &wanted,
            rules.max_row_group_bytes,
        )?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
        let builder = builder.with_projection(mask);
        let stream = builder
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| input_error(&display, 0, e.to_string()))?;
        let converted = stream.map(move |batch| {
            let batch = batch.map_err(|e| input_error(&display, first_row + 1, e.to_string()))?;
            let out =
                parquet_batch_to_documents(&batch, &display, &key, first_row, policy, &stats)?;
            first_row += batch.num_rows() as u64;
            Ok(out)
        });
        Ok::<_, DataFusionError>(converted)
    })
    .try_flatten()
    .boxed()
}

/// Fails, naming the file, the row group and the limit, when a row group of the shard holds
/// more than `limit` bytes in the document columns `roots` once decoded: it would be read
/// into memory whole.
fn check_row_groups(
    metadata: &datafusion::parquet::file::metadata::ParquetMetaData,
    file: &InputFile,
    roots: &[usize],
    limit: u64,
) -> datafusion::error::Result<()> {
    let schema = metadata.file_metadata().schema_descr();
    let groups = match &file.row_groups {
        Some(r) => r.clone(),
        None => 0..metadata.num_row_groups(),
    };
    for g in groups {
        let bytes: i64 = metadata
            .row_group(g)
            .columns()
            .iter()
            .enumerate()
            .filter(|(c, _)| roots.contains(&schema.get_column_root_idx(*c)))
            .map(|(_, column)| column.uncompressed_size())
            .sum();
        if bytes.max(0) as u64 > limit {
            return Err(input_error(
                &file.display,
                0,
                format!(
                    "row group {g} holds {} MB of document columns uncompressed, more than [input] max_row_group_bytes ({} MB) allows to decode at once; rewrite the file with smaller row groups, or raise the limit",
                    bytes >> 20,
                    limit >> 20
                ),
            ));
        }
    }
    Ok(())
}

#[expect(deprecated, reason = "parquet 59's only object_store reader")]
async fn parquet_builder(
    file: &InputFile,
) -> datafusion::error::Result<ParquetRecordBatchStreamBuilder<ParquetObjectReader>> {
    let reader = ParquetObjectReader::new(Arc::clone(&file.store), file.path.clone());
    ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| {
            // A store that refuses or fails the read is not a malformed file.
            let refused = matches!(&e, ParquetError::External(inner)
                if inner.downcast_ref::<object_store::Error>().is_some());
            let what = if refused {
                "cannot read it"
            } else {
                "not a readable Parquet file"
            };
            input_error(&file.display, 0, format!("{what}: {e}"))
        })
}

/// Cuts Parquet files larger than `shard_bytes` (compressed) into shards of whole row groups
/// of about that size; other files stay one shard each.
pub async fn split_large_parquet(
    files: Vec<InputFile>,
    shard_bytes: u64,
) -> crate::error::Result<Vec<InputFile>> {
    let mut out = Vec::with_capacity(files.len());
    for file in files {
        if file.format != InputFormat::Parquet || file.size <= shard_bytes {
            out.push(file);
            continue;
        }
        let builder = parquet_builder(&file).await?;
        let groups = builder.metadata().row_groups();
        let mut start = 0;
        let mut bytes = 0u64;
        for (i, group) in groups.iter().enumerate() {
            bytes += group.compressed_size().max(0) as u64;
            if bytes >= shard_bytes || i + 1 == groups.len() {
                out.push(InputFile {
                    row_groups: Some(start..i + 1),
                    ..file.clone()
                });
                start = i + 1;
                bytes = 0;
            }
        }
    }
    Ok(out)
}

fn input_error(file: &str, line: u64, message: String) -> DataFusionError {
    DataFusionError::from(Error::Input {
        file: file.to_string(),
        line,
        message,
    })
}

fn parquet_batch_to_documents(
    batch: &RecordBatch,
    file: &str,
    key: &str,
    first_row: u64,
    policy: BadLinePolicy,
    stats: &IngestStats,
) -> datafusion::error::Result<RecordBatch> {
    let n = batch.num_rows();
    let column = |name: &str| -> datafusion::error::Result<Option<ArrayRef>> {
        match batch.column_by_name(name) {
            None => Ok(None),
            Some(c) => match cast(c, &DataType::Utf8) {
                Ok(c) => Ok(Some(c)),
                // Nested metadata cannot be cast to text; it is left out rather than failing.
                Err(_) if name == "metadata" => Ok(None),
                Err(e) => Err(input_error(
                    file,
                    first_row + 1,
                    format!("column '{name}' cannot be read as text: {e}"),
                )),
            },
        }
    };
    let Some(text) = column("text")? else {
        return Err(input_error(
            file,
            0,
            "the file has no 'text' column; documents need one".to_string(),
        ));
    };
    if let Some(row) = (0..n).find(|&i| text.is_null(i))
        && policy == BadLinePolicy::Error
    {
        return Err(input_error(
            file,
            first_row + row as u64 + 1,
            "column 'text' is null; fix the row, or set [input] on_bad_line = \"skip\"".to_string(),
        ));
    }
    let ids: StringArray = match column("id")? {
        Some(ids) => {
            let ids = ids
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("cast to Utf8");
            (0..n)
                .map(|i| {
                    Some(if ids.is_null(i) {
                        format!("{key}:{}", first_row + i as u64 + 1)
                    } else {
                        ids.value(i).to_string()
                    })
                })
                .collect()
        }
        None => (0..n)
            .map(|i| Some(format!("{key}:{}", first_row + i as u64 + 1)))
            .collect(),
    };
    let nulls = || -> ArrayRef { Arc::new(StringArray::new_null(n)) };
    let lines: datafusion::arrow::array::Int64Array = (0..n)
        .map(|i| Some((first_row + i as u64 + 1) as i64))
        .collect();
    let out = RecordBatch::try_new(
        documents_schema(),
        vec![
            Arc::new(ids),
            Arc::clone(&text),
            column("source")?.unwrap_or_else(nulls),
            column("added")?.unwrap_or_else(nulls),
            column("created")?.unwrap_or_else(nulls),
            column("metadata")?.unwrap_or_else(nulls),
            Arc::new(std::iter::repeat_n(Some(file), n).collect::<StringArray>()),
            Arc::new(lines),
        ],
    )?;
    let keep: datafusion::arrow::array::BooleanArray =
        (0..n).map(|i| Some(!text.is_null(i))).collect();
    let skipped = n - keep.true_count();
    for _ in 0..skipped {
        stats.add_skip("missing_text");
    }
    stats.add_documents((n - skipped) as u64);
    Ok(if skipped > 0 {
        filter_record_batch(&out, &keep)?
    } else {
        out
    })
}
