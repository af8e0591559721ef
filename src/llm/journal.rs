//! The response journal: every completed LLM response, recorded durably under the output root
//! as soon as it arrives, keyed by the request's hash. A rerun on any machine answers a
//! journaled request from here instead of paying for it again.
//!
//! Object stores cannot append, so responses are group-committed: a writer task collects what
//! arrived while its previous write was in flight and writes it as one new segment object
//! (`_journal/<writer>-<seq>.jsonl`). A call keeps its server slot until its response is
//! durable, so at any moment the responses that a kill could lose are at most the requests
//! in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Context, Error, Result};
use crate::llm::reply::Reply;
use crate::storage::Location;

/// Directory of the journal under the output root.
pub const JOURNAL_DIR: &str = "_journal";

/// Most responses written in one segment.
const MAX_SEGMENT_ENTRIES: usize = 4096;

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

/// Responses recorded so far (by this and earlier runs) and the writer of new ones.
#[derive(Debug)]
pub struct Journal {
    known: Mutex<HashMap<String, Entry>>,
    writer: Option<mpsc::UnboundedSender<Pending>>,
    failed: Arc<AtomicBool>,
    loaded: u64,
    spent_usd: f64,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.entry.key)
    }
}

impl Journal {
    /// Loads every segment under `<root>/_journal/` and starts the writer.
    pub async fn open(root: &Location) -> Result<Self> {
        let dir = root.child(JOURNAL_DIR);
        let mut segments: Vec<_> = dir.store.list(Some(&dir.prefix)).try_collect().await?;
        segments.sort_by(|a, b| a.location.cmp(&b.location));
        let mut known = HashMap::new();
        for meta in segments {
            let bytes = dir.store.get(&meta.location).await?.bytes().await?;
            for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                if line.is_empty() {
                    continue;
                }
                let entry: Entry = serde_json::from_slice(line).with_context(|| {
                    format!(
                        "journal segment {} line {} (move the segment away to continue; its responses will be requested again)",
                        dir.display(&meta.location),
                        i + 1
                    )
                })?;
                known.insert(entry.key.clone(), entry);
            }
        }
        let loaded = known.len() as u64;
        let spent_usd = known.values().map(|e| e.cost_usd).sum();
        let failed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_segments(dir, rx, Arc::clone(&failed)));
        Ok(Self {
            known: Mutex::new(known),
            writer: Some(tx),
            failed,
            loaded,
            spent_usd,
        })
    }

    /// What the responses found when the journal was opened cost, over every worker and run.
    pub fn spent_usd(&self) -> f64 {
        self.spent_usd
    }

    /// Responses found when the journal was opened.
    pub fn loaded(&self) -> u64 {
        self.loaded
    }

    /// The journaled response for `key`, if any.
    pub fn get(&self, key: &str) -> Option<Reply> {
        let known = self.known.lock().expect("lock poisoned");
        known.get(key).map(|e| Reply {
            text: e.text.clone(),
            finish_reason: e.finish_reason.clone(),
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            top_logprobs: e.top_logprobs.clone(),
            cached: true,
            ..Reply::default()
        })
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
            cost_usd: reply.cost_usd,
        };
        self.known
            .lock()
            .expect("lock poisoned")
            .insert(key.to_string(), entry.clone());
        let Some(writer) = &self.writer else { return };
        let (done, wait) = oneshot::channel();
        if writer.send(Pending { entry, done }).is_ok() {
            let _ = wait.await;
        }
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

async fn write_segments(
    dir: Location,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    failed: Arc<AtomicBool>,
) {
    let writer = writer_id();
    let mut seq = 0u64;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_SEGMENT_ENTRIES {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let mut body = Vec::new();
        for p in &batch {
            serde_json::to_writer(&mut body, &p.entry).expect("entries serialise");
            body.push(b'\n');
        }
        let path = dir.path(&format!("{writer}-{seq:08}.jsonl"));
        seq += 1;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        if let Err(e) = dir
            .store
            .put_opts(&path, PutPayload::from(body), opts)
            .await
        {
            tracing::error!(error = %e, segment = %dir.display(&path), "Journal write failed.");
            failed.store(true, Ordering::SeqCst);
        }
        for p in batch {
            let _ = p.done.send(());
        }
    }
}
