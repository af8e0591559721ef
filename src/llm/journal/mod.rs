//! The response journal: every completed LLM response, recorded durably under the output root
//! as soon as it arrives, keyed by the request's hash. A rerun on any machine answers a
//! journaled request from here instead of paying for it again.
//!
//! The journal is kept per stage and shard (`_journal/<stage>/<shard>/`), so what a worker
//! reads follows the shards it runs, not the history of the root, and memory holds only the
//! responses of the shards running. A request its shard's journal cannot answer is looked up
//! in the whole stage's (see [`index`]): a response is found by its key wherever its row sat
//! when it was paid for. While a shard runs on an object store, its responses are
//! group-committed: a writer task collects what arrived while its previous write was in flight
//! and writes it as one new segment object (`<writer>-<seq>.jsonl`). On a local disk, where
//! that would be a file created (and later deleted) per response, each call appends its line
//! to one file per writer instead (`<writer>.jsonl`; a line torn by a kill is ignored). A call
//! keeps its server slot until its response is durable, so a kill loses at most the requests
//! in flight; a write that fails holds its slot and is retried, and no new request leaves
//! until it succeeds. Once the shard is published its segments are compacted into one object
//! (`_journal/<stage>/<shard>.jsonl`, with its keys in `<shard>.keys`).
//! What every run reads whole is small: the results of offline batches (`_imported/`),
//! segments of the flat layout of older versions, and one spend record per writer
//! (`_spend/`), which the budget adds up over every worker and run.

mod index;
mod read;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Context, Error, Result};
use crate::execution_error;
use crate::llm::reply::Reply;
use crate::storage::Location;
use crate::storage::delete_if_exists;
use index::StageIndex;
use read::*;
use writer::*;

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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

/// What one writer (this process) has spent, written to `_spend/<writer>.json` as the
/// responses that cost it are journaled: rewritten whole on an object store, appended as a
/// line on a local disk (the last whole line counts), so a kill loses only what was in flight.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Spend {
    spent_usd: f64,
    /// The worker slot (index, count) of the process, when it ran as one: a budget is
    /// shared out by slot, and a restarted worker takes up its own slot's share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slot: Option<(usize, usize)>,
    /// What this process paid so far (its record says the larger of this and `reserved_usd`).
    #[serde(skip)]
    paid_usd: f64,
    /// Under a budget: what the calls paid and in flight may reach before the record is
    /// written again, so a kill leaves in the record what was on the wire.
    #[serde(skip)]
    reserved_usd: f64,
    /// True while some spend is not in the written record yet (its write failed).
    #[serde(skip)]
    unwritten: bool,
    /// On a local disk: the record's file, appended to.
    #[serde(skip)]
    appending: Option<std::fs::File>,
    /// Lines appended to it since it was last written whole.
    #[serde(skip)]
    appended: u32,
    /// Whether each write is flushed to the device.
    #[serde(skip)]
    sync: bool,
}

/// Lines a local spend record grows by before it is replaced by one: it is read whole by
/// every run.
const SPEND_LINES: u32 = 1024;

impl Spend {
    /// The record in `body`: one JSON object, or lines of them of which the last whole one
    /// counts.
    fn parse(body: &[u8]) -> Option<Spend> {
        serde_json::from_slice(body).ok().or_else(|| {
            body.split(|b| *b == b'\n')
                .rev()
                .find_map(|line| serde_json::from_slice(line).ok())
        })
    }
}

/// How long journal writes may keep failing before the run stops: long enough to make room
/// on a full disk, short enough that a job does not hold its servers forever.
const GIVE_UP_AFTER: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// What reading the journal took: objects fetched, and lines skipped as unreadable (torn by
/// a kill or a full disk; their responses are requested again).
#[derive(Debug, Default)]
struct ReadCounters {
    objects: AtomicU64,
    skipped_lines: AtomicU64,
}

/// Whether journal writes are going through. While one fails no new request is sent: a
/// response paid for and not written would be paid for again by the next run.
#[derive(Debug, Default)]
struct WriteHealth {
    /// Writers whose last write failed.
    failing: AtomicU64,
    /// Set once a write failed for [`GIVE_UP_AFTER`]: the run stops.
    gave_up: AtomicBool,
    changed: tokio::sync::Notify,
}

/// The journal of an output root: opens the scope of each stage and shard, and knows what
/// every worker and earlier run spent.
#[derive(Debug)]
pub struct Journal {
    dir: Location,
    writer: String,
    seq: Arc<AtomicU64>,
    health: Arc<WriteHealth>,
    /// Responses any shard may ask for: imported batch results and the flat layout.
    shared: Arc<HashMap<String, Entry>>,
    spend: Arc<tokio::sync::Mutex<Spend>>,
    spent_at_open: f64,
    /// Every spend record as read when the journal was opened.
    spends: Vec<Spend>,
    counters: Arc<ReadCounters>,
    /// Each stage's index of responses by shard, read on the stage's first miss.
    indexes: Mutex<HashMap<String, Arc<StageIndex>>>,
    /// Whether local appends are flushed to the device (`[execution] fsync`).
    sync: bool,
}

impl Journal {
    /// Opens the journal under `root`: reads what every run shares (batch results, older
    /// segments, spend records), not the responses of each shard.
    pub async fn open(root: &Location) -> Result<Self> {
        let dir = root.child(JOURNAL_DIR);
        let listing = dir.store.list_with_delimiter(Some(&dir.prefix)).await?;
        let flat: Vec<ObjectMeta> = listing
            .objects
            .into_iter()
            .filter(|m| m.location.as_ref().ends_with(".jsonl"))
            .collect();
        let counters = Arc::new(ReadCounters::default());
        let mut shared = read_segments(&dir, flat, &counters).await?;
        // Older versions wrote no spend records: what the flat layout cost is counted here.
        // Imported results are in their importer's record.
        let flat_cost: f64 = shared.values().map(|e| e.cost_usd).sum();
        let imported = dir.child(IMPORTED_DIR);
        shared.extend(read_segments(&dir, list(&imported).await?, &counters).await?);
        let spend_dir = dir.child(SPEND_DIR);
        // One record per process that ever spent: read side by side, as the segments are.
        let mut records = list(&spend_dir).await?;
        // A `.json.tmp` a kill left while a record was replaced is not a record.
        records.retain(|m| m.location.as_ref().ends_with(".json"));
        let spends: Vec<Option<Spend>> = futures::stream::iter(records)
            .map(|meta| {
                let spend_dir = &spend_dir;
                async move {
                    let got = spend_dir.store.get(&meta.location).await?.bytes().await?;
                    Ok::<_, Error>(Spend::parse(&got))
                }
            })
            .buffered(PARALLEL_READS)
            .try_collect()
            .await?;
        let spends: Vec<Spend> = spends.into_iter().flatten().collect();
        let spent_at_open = flat_cost + spends.iter().map(|s| s.spent_usd).sum::<f64>();
        Ok(Self {
            dir,
            writer: writer_id(),
            seq: Arc::default(),
            health: Arc::default(),
            shared: Arc::new(shared),
            spend: Arc::default(),
            spent_at_open,
            spends,
            counters,
            indexes: Mutex::default(),
            sync: false,
        })
    }

    /// Flushes every local journal and spend write to the device before it counts as done
    /// (`[execution] fsync`), so a power loss loses nothing paid for.
    pub async fn sync_local_writes(&mut self, on: bool) {
        self.sync = on;
        self.spend.lock().await.sync = on;
    }

    /// Responses every scope shares (imported batch results, the flat layout of older runs).
    pub fn loaded(&self) -> u64 {
        self.shared.len() as u64
    }

    /// Journal objects fetched so far (segments and compacted shards; listings not counted):
    /// when opened and by every scope.
    pub fn objects_read(&self) -> u64 {
        self.counters.objects.load(Ordering::Relaxed)
    }

    /// Journal lines skipped as unreadable so far (torn by a kill or a full disk).
    pub fn skipped_lines(&self) -> u64 {
        self.counters.skipped_lines.load(Ordering::Relaxed)
    }

    /// Responses found in the journal of a shard other than the one asking (rows moved by a
    /// reshard, a changed rule or a renamed input).
    pub fn found_elsewhere(&self) -> u64 {
        let indexes = self.indexes.lock().expect("lock poisoned");
        indexes
            .values()
            .map(|i| i.found.load(Ordering::Relaxed))
            .sum()
    }

    fn index_of(&self, stage: &str) -> Arc<StageIndex> {
        let mut indexes = self.indexes.lock().expect("lock poisoned");
        let index = indexes.entry(stage.to_string()).or_insert_with(|| {
            Arc::new(StageIndex::new(
                self.dir.child(stage),
                Arc::clone(&self.counters),
            ))
        });
        Arc::clone(index)
    }

    /// What this process, worker `index` of `count`, may spend of a job budget of
    /// `budget_usd`: an equal share of what runs with another worker count left, less what
    /// earlier processes of the same slot spent. The shares add up to what is left of the
    /// budget however often each worker is restarted. Also marks this process's spend record
    /// with its slot.
    pub async fn budget_share(&self, budget_usd: f64, index: usize, count: usize) -> f64 {
        let count = count.max(1);
        self.spend.lock().await.slot = Some((index, count));
        let in_slots = |s: &&Spend| s.slot.is_some_and(|(_, n)| n == count);
        let elsewhere = self.spent_at_open
            - self
                .spends
                .iter()
                .filter(in_slots)
                .map(|s| s.spent_usd)
                .sum::<f64>();
        let mine: f64 = self
            .spends
            .iter()
            .filter(in_slots)
            .filter(|s| s.slot.is_some_and(|(i, _)| i == index))
            .map(|s| s.spent_usd)
            .sum();
        ((budget_usd - elsewhere) / count as f64 - mine).max(0.0)
    }

    /// The responses of shard `shard` of `stage`, and the writer of new ones there.
    pub async fn scope(&self, stage: &str, shard: &str) -> Result<Arc<JournalScope>> {
        let stage_dir = self.dir.child(stage);
        let segments = stage_dir.child(shard);
        let compacted = stage_dir.path(&format!("{shard}.jsonl"));
        let known = read_shard(&stage_dir, shard, &self.counters).await?;
        let mut scope = self.scope_over(known, Some(segments), Some((stage_dir, compacted)));
        let index = self.index_of(stage);
        scope.index = Some((Arc::clone(&index), shard.to_string()));
        let scope = Arc::new(scope);
        index.open(shard, Arc::downgrade(&scope));
        Ok(scope)
    }

    /// Every response of `stage`, whatever its shard, for writing down its requests for an
    /// offline batch (it records nothing).
    pub async fn stage_scope(&self, stage: &str) -> Result<Arc<JournalScope>> {
        let stage_dir = self.dir.child(stage);
        let mut again = true;
        let known = loop {
            let mut objects = list(&stage_dir).await?;
            objects.retain(|m| m.location.as_ref().ends_with(".jsonl"));
            let (known, vanished) = read_objects(&stage_dir, objects, &self.counters).await?;
            // A shard compacted meanwhile: list again, so none of its answers is missed.
            if !vanished || !std::mem::take(&mut again) {
                if vanished {
                    return execution_error!(
                        "the journal of stage '{stage}' kept changing while it was read; run again"
                    );
                }
                break known;
            }
        };
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
        let spend: Option<SpendRecord> = segments.as_ref().map(|_| {
            (
                Arc::clone(&self.spend),
                (self.dir.child(SPEND_DIR), self.writer.clone()),
            )
        });
        let writer = segments.clone().zip(spend.clone()).map(|(dir, spend)| {
            let writer = SegmentWriter {
                appending: None,
                name: self.writer.clone(),
                seq: Arc::clone(&self.seq),
                health: Arc::clone(&self.health),
                failing: false,
                maybe_torn: false,
                sync: self.sync,
                spend,
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
            writer_name: self.writer.clone(),
            segments,
            compact_to,
            retain: true,
            index: None,
            health: Arc::clone(&self.health),
            counters: Arc::clone(&self.counters),
            spend,
        }
    }

    /// Writes what this process spent since its spend record was last written; a run calls
    /// it when it ends, however it ends.
    pub async fn flush_spend(&self) -> Result<()> {
        let mut spend = self.spend.lock().await;
        // Nothing is in flight any more: the record says what was paid.
        if spend.reserved_usd > spend.paid_usd {
            spend.unwritten = true;
        }
        spend.reserved_usd = 0.0;
        if spend.unwritten {
            let path = (self.dir.child(SPEND_DIR), self.writer.clone());
            write_spend(&path, &mut spend).await?;
        }
        Ok(())
    }

    /// Fails once journal writes have failed for good: completed work would not survive a
    /// crash.
    pub fn check(&self) -> Result<()> {
        if self.health.gave_up.load(Ordering::SeqCst) {
            return Err(Error::Execution(gave_up_message()));
        }
        Ok(())
    }
}

fn gave_up_message() -> String {
    format!(
        "the response journal could not be written for {} minutes (see the log); stopped so no more paid responses are lost",
        GIVE_UP_AFTER.as_secs() / 60
    )
}

/// This process's spend record, and the folder and name it is written under.
type SpendRecord = (Arc<tokio::sync::Mutex<Spend>>, (Location, String));

/// The responses of one stage's shard (or of what every shard shares), and the writer of
/// new ones: what an LLM function of that shard's session asks and records.
#[derive(Debug)]
pub struct JournalScope {
    known: Mutex<HashMap<String, Entry>>,
    shared: Arc<HashMap<String, Entry>>,
    writer: Option<Writer>,
    /// This process's writer name, which its segments start with.
    writer_name: String,
    segments: Option<Location>,
    compact_to: Option<(Location, Path)>,
    /// Whether recorded responses are kept for lookups (not when importing).
    retain: bool,
    /// The stage's index and this scope's shard in it: where a miss is looked up.
    index: Option<(Arc<StageIndex>, String)>,
    health: Arc<WriteHealth>,
    counters: Arc<ReadCounters>,
    /// This process's spend record and where it goes, for scopes that write.
    spend: Option<SpendRecord>,
}

impl JournalScope {
    /// A scope that remembers nothing and writes nothing, for sessions that call no LLM
    /// (planning, dedup passes).
    pub fn none() -> Arc<Self> {
        Arc::new(Self {
            known: Mutex::default(),
            shared: Arc::default(),
            writer: None,
            writer_name: String::new(),
            segments: None,
            compact_to: None,
            retain: true,
            index: None,
            health: Arc::default(),
            counters: Arc::default(),
            spend: None,
        })
    }

    /// The entry journaled for `key` in this scope, if any.
    fn entry(&self, key: &str) -> Option<Entry> {
        self.known.lock().expect("lock poisoned").get(key).cloned()
    }

    /// The response journaled for `key` in this scope (or shared by all), if any.
    pub fn get(&self, key: &str) -> Option<Reply> {
        let known = self.known.lock().expect("lock poisoned");
        known
            .get(key)
            .or_else(|| self.shared.get(key))
            .map(reply_of)
    }

    /// The response journaled for `key` anywhere in the stage: this scope's, else another
    /// shard's, which is then recorded here too (at no cost), so the next run finds it in
    /// this shard. An error when the stage's journal cannot be read: taking that for "not
    /// journaled" would pay for the request again.
    pub async fn lookup(&self, key: &str) -> Result<Option<Reply>, String> {
        if let Some(reply) = self.get(key) {
            return Ok(Some(reply));
        }
        let Some((index, shard)) = &self.index else {
            return Ok(None);
        };
        match index.find(key, shard).await {
            Ok(Some(entry)) => {
                let reply = reply_of(&entry);
                self.write(Entry {
                    cost_usd: 0.0,
                    ..entry
                })
                .await;
                Ok(Some(reply))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(format!(
                "the stage's response journal could not be read, so no request was sent that it may answer: {e}"
            )),
        }
    }

    /// Records `reply`, paid for by an identical call of another scope, here as well (at no
    /// cost), so this scope's shard finds it on the next run whatever became of the other.
    pub async fn record_shared(&self, key: &str, reply: &Reply) {
        if reply.error.is_none() && self.get(key).is_none() {
            let mut entry = entry_of(key, reply);
            entry.cost_usd = 0.0;
            self.write(entry).await;
        }
    }

    /// Waits while journal writes are failing, so no request is paid for that could not be
    /// recorded; an error once they have failed for good.
    pub async fn writable(&self) -> Result<(), String> {
        loop {
            let changed = self.health.changed.notified();
            if self.health.gave_up.load(Ordering::SeqCst) {
                return Err(gave_up_message());
            }
            if self.health.failing.load(Ordering::SeqCst) == 0 {
                return Ok(());
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), changed).await;
        }
    }

    /// Responses this scope holds (not counting the shared ones).
    pub fn len(&self) -> usize {
        self.known.lock().expect("lock poisoned").len()
    }

    /// True when the scope holds no response of its own.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that this process's calls, paid and in flight, may cost up to `usd` before
    /// the record is written again: written before a request leaves, so a process killed
    /// with calls on the wire leaves them counted. False when it could not be written.
    pub async fn reserve(&self, usd: f64) -> bool {
        let Some((spend, path)) = &self.spend else {
            return true;
        };
        let mut spend = spend.lock().await;
        if usd <= spend.reserved_usd {
            return true;
        }
        spend.reserved_usd = usd;
        match write_spend(path, &mut spend).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "Could not record the budget held for calls in flight; trying again with the next call.");
                false
            }
        }
    }

    /// Adds `cost_usd`, billed for an attempt that gave nothing to journal (a reply that
    /// could not be read), to this process's spend record.
    pub async fn charge(&self, cost_usd: f64) {
        if let Some(record) = &self.spend {
            pay(record, cost_usd, true).await;
        }
    }

    /// Records a successful response and waits until it is durable.
    pub async fn record(&self, key: &str, reply: &Reply) {
        self.write(entry_of(key, reply)).await;
    }

    async fn write(&self, entry: Entry) {
        let key = entry.key.clone();
        if self.retain {
            self.known
                .lock()
                .expect("lock poisoned")
                .insert(key.clone(), entry.clone());
        }
        // After the insert: a lookup sent here by the note finds the entry.
        if let Some((index, shard)) = &self.index {
            index.note(&key, shard);
        }
        match &self.writer {
            None => {}
            Some(Writer::Appending(writer)) => {
                writer
                    .lock()
                    .await
                    .write_until_durable(std::slice::from_ref(&entry))
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

    /// Folds the shard's segments into one object sorted by key, with its keys beside it for
    /// the stage's index, once its output is published: a later run reads one object for the
    /// shard. What the compacted object holds now (another process may have rewritten it
    /// since this one opened the shard) and the segments listed are merged, and the object is
    /// replaced only if it is still the version read. Then, and only then, this writer's
    /// segments go, and other writers' that are no longer written to: a segment another
    /// writer adds or appends to meanwhile stays, and a crash in between loses nothing.
    pub async fn compact(&self) -> Result<()> {
        let (Some(segments), Some((stage_dir, compacted))) = (&self.segments, &self.compact_to)
        else {
            return Ok(());
        };
        for _ in 0..3 {
            let _local = crate::run::claim::local_lock(stage_dir, compacted).await?;
            let written = list(segments).await?;
            if written.is_empty() {
                return Ok(());
            }
            let foreign: Vec<ObjectMeta> = written
                .iter()
                .filter(|m| {
                    m.location
                        .filename()
                        .is_none_or(|name| !name.starts_with(&self.writer_name))
                })
                .cloned()
                .collect();
            let (current, version) = match stage_dir.store.get(compacted).await {
                Ok(got) => {
                    let version = object_store::UpdateVersion {
                        e_tag: got.meta.e_tag.clone(),
                        version: got.meta.version.clone(),
                    };
                    (Some(got.bytes().await?), Some(version))
                }
                Err(object_store::Error::NotFound { .. }) => (None, None),
                Err(e) => return Err(e.into()),
            };
            let (mut all, vanished) = read_objects(segments, foreign, &self.counters).await?;
            if vanished {
                // Another process folded them in meanwhile: read its object again.
                continue;
            }
            if let Some(bytes) = &current {
                parse_lines(stage_dir, compacted, bytes, &self.counters, &mut all);
            }
            all.extend(
                self.known
                    .lock()
                    .expect("lock poisoned")
                    .iter()
                    .map(|(k, e)| (k.clone(), e.clone())),
            );
            let mut entries: Vec<Entry> = all.into_values().collect();
            entries.sort_by(|a, b| a.key.cmp(&b.key));
            let body = lines_of(&entries);
            let size = body.len() as u64;
            let mode = match version {
                Some(version) => object_store::PutMode::Update(version),
                None => object_store::PutMode::Create,
            };
            let put = stage_dir
                .store
                .put_opts(compacted, PutPayload::from(body.clone()), mode.into())
                .await;
            match put {
                Ok(_) => {}
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => continue,
                // A local disk (under the folder's lock) and stores without conditional
                // writes.
                Err(object_store::Error::NotImplemented { .. }) => {
                    stage_dir
                        .store
                        .put(compacted, PutPayload::from(body))
                        .await?;
                }
                Err(e) => return Err(e.into()),
            }
            let shard = compacted
                .as_ref()
                .strip_suffix(".jsonl")
                .unwrap_or_default();
            stage_dir
                .store
                .put(
                    &Path::from(format!("{shard}.keys")),
                    index::key_file(&entries, size),
                )
                .await?;
            // Another writer's segment may still grow (a local file is appended to): it goes
            // only once nothing was added to it for a claim's lapse, when its writer no longer
            // holds the shard.
            let now = crate::run::claim::unix_now() as i64;
            for meta in written {
                let own = meta
                    .location
                    .filename()
                    .is_some_and(|name| name.starts_with(&self.writer_name));
                let idle =
                    now - meta.last_modified.timestamp() >= crate::run::claim::LAPSE_SECS as i64;
                // Looked at again just before it goes: one that grew since it was read stays.
                let goes = own
                    || (idle
                        && segments.head(&meta.location).await?.is_some_and(|m| {
                            m.size == meta.size && m.last_modified == meta.last_modified
                        }));
                if goes {
                    delete_if_exists(segments, &meta.location).await?;
                }
            }
            return Ok(());
        }
        execution_error!(
            "the journal of {} kept changing while it was compacted; left as it is",
            segments.describe()
        )
    }
}

/// The objects directly and below `dir`.
async fn list(dir: &Location) -> Result<Vec<ObjectMeta>> {
    Ok(dir.store.list(Some(&dir.prefix)).try_collect().await?)
}

/// The entry a response is journaled as.
fn entry_of(key: &str, reply: &Reply) -> Entry {
    Entry {
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
    }
}

/// A journaled response as the reply of a call that sent nothing.
fn reply_of(e: &Entry) -> Reply {
    Reply {
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
    }
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
