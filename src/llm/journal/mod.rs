//! The response journal: every completed LLM response, recorded durably under the output root
//! as soon as it arrives, keyed by the request's hash. A rerun on any machine answers a
//! journaled request from here instead of paying for it again.
//!
//! The journal is kept per stage and shard (`_journal/<stage>/<shard>/`), so what a worker
//! reads follows the shards it runs, not the history of the root, and memory holds only the
//! responses of the shards running. While a shard runs on an object store, its responses are
//! group-committed: a writer task collects what arrived while its previous write was in flight
//! and writes it as one new segment object (`<writer>-<seq>.jsonl`). On a local disk, where
//! that would be a file created (and later deleted) per response, each call appends its line
//! to one file per writer instead (`<writer>.jsonl`; a line torn by a kill is ignored). A call
//! keeps its server slot until its response is durable, so a kill loses at most the requests
//! in flight. Once the shard is published its segments are compacted into one object (`_journal/<stage>/<shard>.jsonl`).
//! What every run reads whole is small: the results of offline batches (`_imported/`),
//! segments of the flat layout of older versions, and one spend record per writer
//! (`_spend/`), which the budget adds up over every worker and run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Context, Error, Result};
use crate::llm::reply::Reply;
use crate::storage::Location;
use crate::storage::{delete_if_exists, read_json, write_json};

/// Directory of the journal under the output root.
pub const JOURNAL_DIR: &str = "_journal";
/// Results of offline batches, which any shard may ask for.
const IMPORTED_DIR: &str = "_imported";
/// One spend record per writer.
const SPEND_DIR: &str = "_spend";

/// Most responses written in one segment.
const MAX_SEGMENT_ENTRIES: usize = 4096;
/// Objects read at once when a scope or the journal is opened.
const PARALLEL_READS: usize = 16;

/// One journaled response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    key: String,
    text: Option<String>,
    finish_reason: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reasoning: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reasoning_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cached_tokens: Option<i64>,
    /// What the call cost at the model's prices, so a budget counts every worker's and every
    /// earlier run's spend.
    #[serde(default, skip_serializing_if = "is_zero")]
    cost_usd: f64,
}

fn is_zero(cost: &f64) -> bool {
    *cost == 0.0
}

struct Pending {
    entry: Entry,
    done: oneshot::Sender<()>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.entry.key)
    }
}

/// What one writer (this process) has spent, written to `_spend/<writer>.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Spend {
    spent_usd: f64,
    /// When the record was last written.
    #[serde(skip)]
    written_at: Option<std::time::Instant>,
    /// True while some spend is not in the written record yet.
    #[serde(skip)]
    unwritten: bool,
}

/// How often the spend record is rewritten while responses cost something: rewriting it per
/// response would create a file per response on a local disk. A run writes what is left
/// when it ends, so only a process killed outright leaves up to this much spend unrecorded.
const SPEND_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The journal of an output root: opens the scope of each stage and shard, and knows what
/// every worker and earlier run spent.
#[derive(Debug)]
pub struct Journal {
    dir: Location,
    writer: String,
    seq: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    /// Responses any shard may ask for: imported batch results and the flat layout.
    shared: Arc<HashMap<String, Entry>>,
    spend: Arc<tokio::sync::Mutex<Spend>>,
    spent_at_open: f64,
    objects_read: AtomicU64,
}

impl Journal {
    /// Opens the journal under `root`: reads what every run shares (batch results, older
    /// segments, spend records), not the responses of each shard.
    pub async fn open(root: &Location) -> Result<Self> {
        let dir = root.child(JOURNAL_DIR);
        let listing = dir.store.list_with_delimiter(Some(&dir.prefix)).await?;
        let mut flat: Vec<ObjectMeta> = listing
            .objects
            .into_iter()
            .filter(|m| m.location.as_ref().ends_with(".jsonl"))
            .collect();
        let imported = dir.child(IMPORTED_DIR);
        flat.extend(list(&imported).await?);
        let objects_read = flat.len() as u64;
        let shared = read_segments(&dir, flat).await?;
        let spend_dir = dir.child(SPEND_DIR);
        // One record per process that ever spent: read side by side, as the segments are.
        let spends: Vec<Option<Spend>> = futures::stream::iter(list(&spend_dir).await?)
            .map(|meta| {
                let spend_dir = &spend_dir;
                async move { read_json::<Spend>(spend_dir, &meta.location).await }
            })
            .buffered(PARALLEL_READS)
            .try_collect()
            .await?;
        let spent_at_open = shared.values().map(|e| e.cost_usd).sum::<f64>()
            + spends.iter().flatten().map(|s| s.spent_usd).sum::<f64>();
        Ok(Self {
            dir,
            writer: writer_id(),
            seq: Arc::default(),
            failed: Arc::default(),
            shared: Arc::new(shared),
            spend: Arc::default(),
            spent_at_open,
            objects_read: AtomicU64::new(objects_read),
        })
    }

    /// Responses every scope shares (imported batch results, the flat layout of older runs).
    pub fn loaded(&self) -> u64 {
        self.shared.len() as u64
    }

    /// Journal objects fetched so far (segments and compacted shards; listings not counted):
    /// when opened and by every scope.
    pub fn objects_read(&self) -> u64 {
        self.objects_read.load(Ordering::Relaxed)
    }

    /// What every worker and run had spent when the journal was opened.
    pub fn spent_usd(&self) -> f64 {
        self.spent_at_open
    }

    /// The responses of shard `shard` of `stage`, and the writer of new ones there.
    pub async fn scope(&self, stage: &str, shard: &str) -> Result<Arc<JournalScope>> {
        let stage_dir = self.dir.child(stage);
        let segments = stage_dir.child(shard);
        let mut objects = list(&segments).await?;
        let compacted = stage_dir.path(&format!("{shard}.jsonl"));
        // A failure taken for absence would send every answered request again.
        objects.extend(stage_dir.head(&compacted).await?);
        self.objects_read
            .fetch_add(objects.len() as u64, Ordering::Relaxed);
        let known = read_segments(&self.dir, objects).await?;
        Ok(Arc::new(self.scope_over(
            known,
            Some(segments),
            Some((stage_dir, compacted)),
        )))
    }

    /// Every response of `stage`, whatever its shard, for writing down its requests for an
    /// offline batch (it records nothing).
    pub async fn stage_scope(&self, stage: &str) -> Result<Arc<JournalScope>> {
        let stage_dir = self.dir.child(stage);
        let objects: Vec<ObjectMeta> = stage_dir
            .store
            .list(Some(&stage_dir.prefix))
            .try_collect()
            .await?;
        self.objects_read
            .fetch_add(objects.len() as u64, Ordering::Relaxed);
        let known = read_segments(&self.dir, objects).await?;
        Ok(Arc::new(self.scope_over(known, None, None)))
    }

    /// Where the results of an offline batch are recorded: every run reads them. It keeps
    /// nothing in memory, so an import of any size costs what is in flight.
    pub fn import_scope(&self) -> Arc<JournalScope> {
        let mut scope = self.scope_over(HashMap::new(), Some(self.dir.child(IMPORTED_DIR)), None);
        scope.retain = false;
        Arc::new(scope)
    }

    fn scope_over(
        &self,
        known: HashMap<String, Entry>,
        segments: Option<Location>,
        compact_to: Option<(Location, Path)>,
    ) -> JournalScope {
        let writer = segments.clone().map(|dir| {
            let writer = SegmentWriter {
                appending: None,
                name: self.writer.clone(),
                seq: Arc::clone(&self.seq),
                failed: Arc::clone(&self.failed),
                spend: Arc::clone(&self.spend),
                spend_path: (self.dir.child(SPEND_DIR), self.writer.clone()),
                dir,
            };
            if writer.dir.store_url.scheme() == "file" {
                Writer::Appending(Box::new(tokio::sync::Mutex::new(writer)))
            } else {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(write_segments(writer, rx));
                Writer::Batched(tx)
            }
        });
        JournalScope {
            known: Mutex::new(known),
            shared: Arc::clone(&self.shared),
            writer,
            segments,
            compact_to,
            retain: true,
        }
    }

    /// Writes what this process spent since its spend record was last written; a run calls
    /// it when it ends, however it ends.
    pub async fn flush_spend(&self) -> Result<()> {
        let mut spend = self.spend.lock().await;
        if spend.unwritten {
            let path = (self.dir.child(SPEND_DIR), self.writer.clone());
            write_spend(&path, &mut spend).await?;
        }
        Ok(())
    }

    /// Fails when a segment could not be written: completed work would not survive a crash.
    pub fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Error::Execution(
                "the response journal could not be written (see the log); stopping so no paid response is lost".into(),
            ));
        }
        Ok(())
    }
}

/// The responses of one stage's shard (or of what every shard shares), and the writer of
/// new ones: what an LLM function of that shard's session asks and records.
#[derive(Debug)]
pub struct JournalScope {
    known: Mutex<HashMap<String, Entry>>,
    shared: Arc<HashMap<String, Entry>>,
    writer: Option<Writer>,
    segments: Option<Location>,
    compact_to: Option<(Location, Path)>,
    /// Whether recorded responses are kept for lookups (not when importing).
    retain: bool,
}

impl JournalScope {
    /// A scope that remembers nothing and writes nothing, for sessions that call no LLM
    /// (planning, dedup passes).
    pub fn none() -> Arc<Self> {
        Arc::new(Self {
            known: Mutex::default(),
            shared: Arc::default(),
            writer: None,
            segments: None,
            compact_to: None,
            retain: true,
        })
    }

    /// The journaled response for `key`, if any.
    pub fn get(&self, key: &str) -> Option<Reply> {
        let known = self.known.lock().expect("lock poisoned");
        let e = known.get(key).or_else(|| self.shared.get(key))?;
        Some(Reply {
            text: e.text.clone(),
            finish_reason: e.finish_reason.clone(),
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            top_logprobs: e.top_logprobs.clone(),
            reasoning: e.reasoning.clone(),
            reasoning_tokens: e.reasoning_tokens,
            cached_tokens: e.cached_tokens,
            cached: true,
            ..Reply::default()
        })
    }

    /// Responses this scope holds (not counting the shared ones).
    pub fn len(&self) -> usize {
        self.known.lock().expect("lock poisoned").len()
    }

    /// True when the scope holds no response of its own.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a successful response and waits until it is durable.
    pub async fn record(&self, key: &str, reply: &Reply) {
        let entry = Entry {
            key: key.to_string(),
            text: reply.text.clone(),
            finish_reason: reply.finish_reason.clone(),
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: reply.completion_tokens,
            top_logprobs: reply.top_logprobs.clone(),
            reasoning: reply.reasoning.clone(),
            reasoning_tokens: reply.reasoning_tokens,
            cached_tokens: reply.cached_tokens,
            cost_usd: reply.cost_usd,
        };
        if self.retain {
            self.known
                .lock()
                .expect("lock poisoned")
                .insert(key.to_string(), entry.clone());
        }
        match &self.writer {
            None => {}
            Some(Writer::Appending(writer)) => {
                writer
                    .lock()
                    .await
                    .write_or_flag(std::slice::from_ref(&entry))
                    .await;
            }
            Some(Writer::Batched(writer)) => {
                let (done, wait) = oneshot::channel();
                if writer.send(Pending { entry, done }).is_ok() {
                    let _ = wait.await;
                }
            }
        }
    }

    /// Folds the shard's segments into one object sorted by key, once its output is
    /// published: a later run reads one object for the shard. The segments go only after
    /// the compacted object is written, so a crash in between loses nothing.
    pub async fn compact(&self) -> Result<()> {
        let (Some(segments), Some((stage_dir, compacted))) = (&self.segments, &self.compact_to)
        else {
            return Ok(());
        };
        let written = list(segments).await?;
        if written.is_empty() {
            return Ok(());
        }
        let mut entries: Vec<Entry> = self
            .known
            .lock()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        stage_dir
            .store
            .put(compacted, PutPayload::from(lines_of(&entries)))
            .await?;
        for meta in written {
            delete_if_exists(segments, &meta.location).await?;
        }
        Ok(())
    }
}

/// Writes this process's spend record.
async fn write_spend((dir, name): &(Location, String), spend: &mut Spend) -> Result<()> {
    let path = dir.path(&format!("{name}.json"));
    write_json(dir, &path, &*spend)
        .await
        .with_context(|| format!("spend record {}", dir.display(&path)))?;
    spend.written_at = Some(std::time::Instant::now());
    spend.unwritten = false;
    Ok(())
}

/// The objects directly and below `dir`.
async fn list(dir: &Location) -> Result<Vec<ObjectMeta>> {
    Ok(dir.store.list(Some(&dir.prefix)).try_collect().await?)
}

/// Every entry of the segment objects `objects` (under `dir`), read side by side; a later
/// entry of a key replaces an earlier one.
async fn read_segments(dir: &Location, objects: Vec<ObjectMeta>) -> Result<HashMap<String, Entry>> {
    let store = Arc::clone(&dir.store);
    let bodies: Vec<(Path, bytes::Bytes)> = futures::stream::iter(objects)
        .map(|meta| {
            let store = Arc::clone(&store);
            async move {
                let bytes = store.get(&meta.location).await?.bytes().await?;
                Ok::<_, Error>((meta.location, bytes))
            }
        })
        .buffered(PARALLEL_READS)
        .try_collect()
        .await?;
    let mut known = HashMap::new();
    for (path, bytes) in bodies {
        // What follows the last newline is a line a kill tore while it was appended.
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |n| n + 1);
        for (i, line) in bytes[..whole].split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let entry: Entry = serde_json::from_slice(line).with_context(|| {
                format!(
                    "journal segment {} line {} (move the segment away to continue; its responses will be requested again)",
                    dir.display(&path),
                    i + 1
                )
            })?;
            known.insert(entry.key.clone(), entry);
        }
    }
    Ok(known)
}

fn lines_of(entries: &[Entry]) -> Vec<u8> {
    let mut body = Vec::new();
    for entry in entries {
        serde_json::to_writer(&mut body, entry).expect("entries serialise");
        body.push(b'\n');
    }
    body
}

static WRITER_SEQ: AtomicU64 = AtomicU64::new(0);

/// A name unique to this writer: time, process and a random part, so concurrent workers on
/// different machines never write the same segment.
fn writer_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{nanos:x}-{:x}-{:08x}-{}",
        std::process::id(),
        fastrand::u32(..),
        WRITER_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// How a scope's responses reach the journal.
enum Writer {
    /// Appended by the call itself (a local disk): one write, no hand-over to another task.
    Appending(Box<tokio::sync::Mutex<SegmentWriter>>),
    /// Group-committed by a writer task (an object store, where each write is a request).
    Batched(mpsc::UnboundedSender<Pending>),
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Writer::Appending(_) => "Appending",
            Writer::Batched(_) => "Batched",
        })
    }
}

/// Where one scope's responses are written, and what it shares with the others of the
/// process.
struct SegmentWriter {
    dir: Location,
    /// On a local disk: the file this writer appends to, once opened.
    appending: Option<std::fs::File>,
    name: String,
    seq: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    spend: Arc<tokio::sync::Mutex<Spend>>,
    spend_path: (Location, String),
}

impl SegmentWriter {
    /// Writes `entries` as one new segment (appended to this writer's file on a local disk);
    /// then, when they cost anything, this process's spend record.
    async fn write(&mut self, entries: &[Entry]) -> Result<()> {
        if self.dir.store_url.scheme() == "file" {
            self.append(entries)?;
        } else {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.path(&format!("{}-{seq:08}.jsonl", self.name));
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            self.dir
                .store
                .put_opts(&path, PutPayload::from(lines_of(entries)), opts)
                .await?;
        }
        let cost: f64 = entries.iter().map(|e| e.cost_usd).sum();
        if cost > 0.0 {
            let mut spend = self.spend.lock().await;
            spend.spent_usd += cost;
            spend.unwritten = true;
            if spend.written_at.is_none_or(|t| t.elapsed() >= SPEND_EVERY) {
                write_spend(&self.spend_path, &mut spend).await?;
            }
        }
        Ok(())
    }
}

impl SegmentWriter {
    /// [`SegmentWriter::write`]; a failure is logged and fails the run at its next check.
    async fn write_or_flag(&mut self, entries: &[Entry]) {
        if let Err(e) = self.write(entries).await {
            tracing::error!(error = %e, dir = %self.dir.describe(), "Journal write failed.");
            self.failed.store(true, Ordering::SeqCst);
        }
    }

    /// Appends `entries` to this writer's file in one write: a small write to the page
    /// cache, where a new file per response cost more CPU than the rest of the call.
    fn append(&mut self, entries: &[Entry]) -> Result<()> {
        use std::io::Write as _;
        let file = match &mut self.appending {
            Some(file) => file,
            None => {
                let path = object_store::local::LocalFileSystem::new()
                    .path_to_filesystem(&self.dir.path(&format!("{}.jsonl", self.name)))?;
                let dir = path.parent().unwrap_or(std::path::Path::new("/"));
                let opened = std::fs::create_dir_all(dir).and_then(|()| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                });
                self.appending
                    .insert(opened.with_context(|| format!("journal {}", path.display()))?)
            }
        };
        file.write_all(&lines_of(entries))
            .with_context(|| format!("journal {}", self.dir.describe()))
    }
}

async fn write_segments(mut writer: SegmentWriter, mut rx: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_SEGMENT_ENTRIES {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let entries: Vec<Entry> = batch.iter().map(|p| p.entry.clone()).collect();
        writer.write_or_flag(&entries).await;
        for p in batch {
            let _ = p.done.send(());
        }
    }
}
