//! Which shard's journal holds each response of a stage, so a request is answered whatever
//! shard its row sits in now: a reshard, a rule that drops rows upstream or a renamed input
//! moves rows between shards, never the answers they already have.
//!
//! A shard's own journal answers the common case; the index is read on a stage's first miss
//! in a process. It holds 12 bytes per journaled response of the stage (a 64-bit fingerprint
//! of the key and the shard holding it), built from the `<shard>.keys` file written beside
//! each compacted shard and from the segments of shards not compacted yet. A hit reads the
//! shard holding the key whole (a shard moved by a reshard draws on one or two old shards) and
//! keeps the last few shards read. What this process journals is noted in it too (about 30
//! bytes a response), and asked of the scope that holds it while that scope is open: an
//! identical prompt in a later shard of the run is not paid again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};

use super::{Entry, JournalScope, PARALLEL_READS, ReadCounters, read_objects, read_shard};
use crate::error::Result;
use crate::storage::Location;

/// What opens a key file: its format, so a file of another version is read as absent.
const KEYS_MAGIC: &[u8; 8] = b"bfkeys3\n";
/// Shards read whole for their answers, kept for the next rows that moved from them.
const SHARDS_KEPT: usize = 8;

/// The 64-bit fingerprint of a journal key: FNV-1a of its bytes, so keys sharing a prefix
/// still spread. Stored in key files, so it never changes.
pub(super) fn fingerprint(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The key file of `entries`, compacted into an object of `compacted_bytes`: that size, then
/// their fingerprints, sorted. A compacted object of another size (written again by a version
/// that writes no key file) is read instead.
pub(super) fn key_file(entries: &[Entry], compacted_bytes: u64) -> PutPayload {
    let mut fps: Vec<u64> = entries.iter().map(|e| fingerprint(&e.key)).collect();
    fps.sort_unstable();
    let mut body = Vec::with_capacity(16 + 8 * fps.len());
    body.extend_from_slice(KEYS_MAGIC);
    body.extend_from_slice(&compacted_bytes.to_le_bytes());
    for fp in fps {
        body.extend_from_slice(&fp.to_le_bytes());
    }
    PutPayload::from(body)
}

/// The fingerprints of a key file describing a compacted object of `compacted_bytes`.
fn parse_key_file(bytes: &[u8], compacted_bytes: u64) -> Option<Vec<u64>> {
    let body = bytes.strip_prefix(KEYS_MAGIC)?;
    if body.len() < 8 || body.len() % 8 != 0 {
        return None;
    }
    let mut words = body
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
    (words.next() == Some(compacted_bytes)).then(|| words.collect())
}

/// The journal objects of one shard of a stage.
#[derive(Debug, Default)]
struct ShardObjects {
    compacted: Option<ObjectMeta>,
    keys: Option<ObjectMeta>,
    segments: Vec<ObjectMeta>,
}

/// Fingerprints sorted, each with the shard holding it.
#[derive(Debug)]
struct Sorted {
    fingerprints: Vec<u64>,
    shards: Vec<u32>,
    names: Vec<Arc<str>>,
}

type Loaded = Arc<tokio::sync::OnceCell<Arc<HashMap<String, Entry>>>>;

/// The index of one stage's journal, read on its first miss.
#[derive(Debug)]
pub(super) struct StageIndex {
    stage_dir: Location,
    sorted: tokio::sync::OnceCell<Sorted>,
    /// Shards read whole, the most recently used last.
    kept: Mutex<Vec<(Arc<str>, Loaded)>>,
    /// The scopes this process has open, by shard.
    live: Mutex<HashMap<Arc<str>, Weak<JournalScope>>>,
    /// What this process journaled since the index was read: fingerprint, shard.
    noted: Mutex<HashMap<u64, Arc<str>>>,
    counters: Arc<ReadCounters>,
    /// Responses found in another shard's journal.
    pub(super) found: AtomicU64,
}

impl StageIndex {
    pub(super) fn new(stage_dir: Location, counters: Arc<ReadCounters>) -> Self {
        Self {
            stage_dir,
            sorted: tokio::sync::OnceCell::new(),
            kept: Mutex::default(),
            live: Mutex::default(),
            noted: Mutex::default(),
            counters,
            found: AtomicU64::new(0),
        }
    }

    /// Records that `scope`, of shard `shard`, is open in this process.
    pub(super) fn open(&self, shard: &str, scope: Weak<JournalScope>) {
        let mut live = self.live.lock().expect("lock poisoned");
        live.retain(|_, s| s.strong_count() > 0);
        live.insert(Arc::from(shard), scope);
    }

    /// Notes that shard `shard` journaled `key`: the index may be being read while it is
    /// written, and miss it.
    pub(super) fn note(&self, key: &str, shard: &str) {
        // The open scope's name, shared: 8 bytes and a pointer a response.
        let name = self
            .live
            .lock()
            .expect("lock poisoned")
            .get_key_value(shard)
            .map_or_else(|| Arc::from(shard), |(name, _)| Arc::clone(name));
        let mut noted = self.noted.lock().expect("lock poisoned");
        noted.insert(fingerprint(key), name);
    }

    /// The entry of `key` in the journal of any shard of the stage but `except`.
    pub(super) async fn find(&self, key: &str, except: &str) -> Result<Option<Entry>> {
        let sorted = self.sorted.get_or_try_init(|| self.load()).await?;
        let fp = fingerprint(key);
        let start = sorted.fingerprints.partition_point(|&f| f < fp);
        let end = start + sorted.fingerprints[start..].partition_point(|&f| f == fp);
        let mut shards: Vec<(Arc<str>, bool)> = sorted.shards[start..end]
            .iter()
            .map(|&id| (Arc::clone(&sorted.names[id as usize]), false))
            .collect();
        shards.extend(
            self.noted
                .lock()
                .expect("lock poisoned")
                .get(&fp)
                .map(|name| (Arc::clone(name), true)),
        );
        shards.dedup_by(|a, b| a.0 == b.0);
        for (name, noted) in shards {
            if &*name == except {
                continue;
            }
            if let Some(entry) = self.in_shard(&name, key, noted).await? {
                self.found.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// The entry of `key` in shard `name`: asked of its scope while open in this process,
    /// else read from the store. A shard this process `noted` the key in is read again if
    /// the copy kept predates it.
    async fn in_shard(&self, name: &Arc<str>, key: &str, noted: bool) -> Result<Option<Entry>> {
        let scope = self
            .live
            .lock()
            .expect("lock poisoned")
            .get(name)
            .and_then(Weak::upgrade);
        if let Some(scope) = scope {
            return Ok(scope.entry(key));
        }
        let found = self.shard(name).await?.get(key).cloned();
        if found.is_some() || !noted {
            return Ok(found);
        }
        self.kept
            .lock()
            .expect("lock poisoned")
            .retain(|(kept, _)| kept != name);
        Ok(self.shard(name).await?.get(key).cloned())
    }

    /// The entries of shard `name`, read once while it is among the last used.
    async fn shard(&self, name: &Arc<str>) -> Result<Arc<HashMap<String, Entry>>> {
        let cell = {
            let mut kept = self.kept.lock().expect("lock poisoned");
            let cell = match kept.iter().position(|(k, _)| k == name) {
                Some(at) => kept.remove(at).1,
                None => Loaded::default(),
            };
            kept.push((Arc::clone(name), Arc::clone(&cell)));
            if kept.len() > SHARDS_KEPT {
                kept.remove(0);
            }
            cell
        };
        let entries = cell
            .get_or_try_init(|| async {
                let read = read_shard(&self.stage_dir, name, &self.counters).await?;
                Ok::<_, crate::error::Error>(Arc::new(read))
            })
            .await?;
        Ok(Arc::clone(entries))
    }

    /// Lists the stage's journal and reads the keys of every shard: key files where a shard
    /// was compacted, the segments themselves where not.
    async fn load(&self) -> Result<Sorted> {
        let mut shards: BTreeMap<String, ShardObjects> = BTreeMap::new();
        for meta in list(&self.stage_dir).await? {
            let Some(parts) = meta.location.prefix_match(&self.stage_dir.prefix) else {
                continue;
            };
            let parts: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
            match parts.as_slice() {
                [file] => {
                    if let Some(shard) = file.strip_suffix(".jsonl") {
                        shards.entry(shard.to_string()).or_default().compacted = Some(meta);
                    } else if let Some(shard) = file.strip_suffix(".keys") {
                        shards.entry(shard.to_string()).or_default().keys = Some(meta);
                    }
                }
                [shard, segment] if segment.ends_with(".jsonl") => {
                    shards.entry(shard.clone()).or_default().segments.push(meta);
                }
                _ => {}
            }
        }
        let names: Vec<Arc<str>> = shards.keys().map(|n| Arc::from(n.as_str())).collect();
        let reads = shards
            .into_iter()
            .enumerate()
            .map(|(id, (name, objects))| async move {
                let fps = self.fingerprints_of(&name, objects).await?;
                Ok::<_, crate::error::Error>((id as u32, fps))
            });
        let per_shard: Vec<(u32, Vec<u64>)> = futures::stream::iter(reads)
            .buffer_unordered(PARALLEL_READS)
            .try_collect()
            .await?;
        let mut pairs: Vec<(u64, u32)> = per_shard
            .into_iter()
            .flat_map(|(id, fps)| fps.into_iter().map(move |fp| (fp, id)))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        let (fingerprints, shards) = pairs.into_iter().unzip();
        Ok(Sorted {
            fingerprints,
            shards,
            names,
        })
    }

    /// The fingerprints of the responses of shard `name`, whose objects were listed as
    /// `objects`.
    async fn fingerprints_of(&self, name: &str, objects: ShardObjects) -> Result<Vec<u64>> {
        let mut bodies = objects.segments;
        let from_key_file = match (&objects.compacted, &objects.keys) {
            (Some(compacted), Some(keys)) => {
                self.counters.objects.fetch_add(1, Ordering::Relaxed);
                match self.stage_dir.store.get(&keys.location).await {
                    Ok(got) => parse_key_file(&got.bytes().await?, compacted.size),
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => return Err(e.into()),
                }
            }
            _ => None,
        };
        if from_key_file.is_none() {
            bodies.extend(objects.compacted);
        }
        let (mut read, vanished) = read_objects(&self.stage_dir, bodies, &self.counters).await?;
        if vanished {
            // Compacted since the listing: its responses are in an object not listed.
            read = read_shard(&self.stage_dir, name, &self.counters).await?;
        }
        let mut fps = from_key_file.unwrap_or_default();
        fps.extend(read.keys().map(|k| fingerprint(k)));
        Ok(fps)
    }
}

/// The objects directly and below `dir`.
async fn list(dir: &Location) -> Result<Vec<ObjectMeta>> {
    Ok(dir.store.list(Some(&dir.prefix)).try_collect().await?)
}
