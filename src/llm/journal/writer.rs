//! Writing the journal: each scope's writer task, appending on a local disk and writing
//! segment objects on stores, retried until durable; and this process's spend record.

use super::*;

/// Adds `cost` to what this process paid, and writes its record when `write`; a failed write
/// is logged and left for the next one or the run's last flush.
pub(super) async fn pay((spend, path): &SpendRecord, cost: f64, write: bool) {
    if cost <= 0.0 {
        return;
    }
    let mut spend = spend.lock().await;
    spend.paid_usd += cost;
    spend.unwritten = true;
    if write && let Err(e) = write_spend(path, &mut spend).await {
        tracing::warn!(error = %e, "Could not write the spend record; trying again later.");
    }
}

/// Writes this process's spend record: a new line of its file on a local disk (a small
/// append, where a new file per response would cost more than the call), else the object.
pub(super) async fn write_spend((dir, name): &(Location, String), spend: &mut Spend) -> Result<()> {
    use std::io::Write as _;
    let path = dir.path(&format!("{name}.json"));
    let shown = || format!("spend record {}", dir.display(&path));
    spend.spent_usd = spend.paid_usd.max(spend.reserved_usd);
    let mut line = serde_json::to_vec(&*spend).expect("a spend record serialises");
    line.push(b'\n');
    if dir.store_url.scheme() == "file" {
        if spend.appended >= SPEND_LINES {
            // Replaced whole by a rename, so a kill leaves the old record or the new one.
            let local = object_store::local::LocalFileSystem::new().path_to_filesystem(&path)?;
            let fresh = local.with_extension("json.tmp");
            let sync = spend.sync;
            std::fs::File::create(&fresh)
                .and_then(|mut file| {
                    file.write_all(&line)?;
                    if sync { file.sync_data() } else { Ok(()) }
                })
                .and_then(|()| std::fs::rename(&fresh, &local))
                .with_context(shown)?;
            spend.appending = None;
            spend.appended = 0;
            spend.unwritten = false;
            return Ok(());
        }
        let file = match &mut spend.appending {
            Some(file) => file,
            None => {
                let local =
                    object_store::local::LocalFileSystem::new().path_to_filesystem(&path)?;
                let opened = std::fs::create_dir_all(local.parent().unwrap_or(&local))
                    .and_then(|()| {
                        std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&local)
                    })
                    .with_context(shown)?;
                spend.appending.insert(opened)
            }
        };
        // A torn line before this one is ended by it, and its own line still reads.
        let mut body = vec![b'\n'];
        body.extend(line);
        file.write_all(&body).with_context(shown)?;
        if spend.sync {
            file.sync_data().with_context(shown)?;
        }
        spend.appended += 1;
    } else {
        dir.store
            .put(&path, PutPayload::from(line))
            .await
            .with_context(shown)?;
    }
    spend.unwritten = false;
    Ok(())
}

/// A name unique to this writer: time, process and a random part, so concurrent workers on
/// different machines never write the same segment.
pub(super) fn writer_id() -> String {
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
pub(super) enum Writer {
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
pub(super) struct SegmentWriter {
    pub(super) dir: Location,
    /// On a local disk: the file this writer appends to, once opened.
    pub(super) appending: Option<std::fs::File>,
    pub(super) name: String,
    pub(super) seq: Arc<AtomicU64>,
    pub(super) health: Arc<WriteHealth>,
    /// Whether this writer's last write failed (it is counted in `health.failing`).
    pub(super) failing: bool,
    /// Whether a failed append may have left part of a line that could not be cut off.
    pub(super) maybe_torn: bool,
    /// Whether each append is flushed to the device.
    pub(super) sync: bool,
    pub(super) spend: SpendRecord,
}

impl SegmentWriter {
    /// Writes `entries` as one new segment (appended to this writer's file on a local disk).
    /// A segment's name is this writer's own, so a plain put never replaces another's: no
    /// create-if-absent, which stores without conditional writes refuse.
    pub(super) async fn write(&mut self, entries: &[Entry]) -> Result<()> {
        if self.dir.store_url.scheme() == "file" {
            return self.append(entries);
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path(&format!("{}-{seq:08}.jsonl", self.name));
        self.dir
            .store
            .put(&path, PutPayload::from(lines_of(entries)))
            .await?;
        Ok(())
    }

    /// Counts what `entries`, which could not be journaled, cost: the run's last flush
    /// records it.
    pub(super) async fn lost(&self, entries: &[Entry]) {
        pay(&self.spend, entries.iter().map(|e| e.cost_usd).sum(), false).await;
    }

    /// Adds what `entries` cost to this process's spend record and writes it.
    pub(super) async fn add_spend(&self, entries: &[Entry]) {
        pay(&self.spend, entries.iter().map(|e| e.cost_usd).sum(), true).await;
    }

    /// [`SegmentWriter::write`], retried until it succeeds: the caller keeps its server slot
    /// meanwhile, and no new request is sent (see [`JournalScope::writable`]), so a crash or
    /// a kill loses only what was in flight. After [`GIVE_UP_AFTER`] of failures the entries
    /// are given up and the run stops.
    pub(super) async fn write_until_durable(&mut self, entries: &[Entry]) {
        let started = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            if self.health.gave_up.load(Ordering::SeqCst) {
                // Paid for, and lost: the budget of the next run must still count it.
                self.lost(entries).await;
                return;
            }
            match self.write(entries).await {
                Ok(()) => {
                    if std::mem::take(&mut self.failing) {
                        tracing::warn!(dir = %self.dir.describe(), "Journal writes succeed again.");
                        self.health.failing.fetch_sub(1, Ordering::SeqCst);
                        self.health.changed.notify_waiters();
                    }
                    self.add_spend(entries).await;
                    return;
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.failing, true) {
                        self.health.failing.fetch_add(1, Ordering::SeqCst);
                    }
                    if started.elapsed() >= GIVE_UP_AFTER {
                        tracing::error!(error = %e, dir = %self.dir.describe(), "{}", gave_up_message());
                        self.health.gave_up.store(true, Ordering::SeqCst);
                        self.health.changed.notify_waiters();
                        self.lost(entries).await;
                        return;
                    }
                    attempt += 1;
                    tracing::error!(
                        error = %e,
                        dir = %self.dir.describe(),
                        "Journal write failed; no new request is sent until it succeeds (make room or fix access). Retrying."
                    );
                    let wait = (0.25 * 2f64.powi(attempt.min(5))).min(5.0);
                    tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
                }
            }
        }
    }

    /// Appends `entries` to this writer's file in one write: a small write to the page
    /// cache, where a new file per response cost more CPU than the rest of the call. A
    /// failed write is cut off again, so the next one starts on a line of its own.
    pub(super) fn append(&mut self, entries: &[Entry]) -> Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::MetadataExt as _;
        // A compaction deleted the file (this scope's own, after it was published): appends
        // to it would go nowhere, so a new one is started.
        if self
            .appending
            .as_ref()
            .is_some_and(|f| f.metadata().is_ok_and(|m| m.nlink() == 0))
        {
            self.appending = None;
        }
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
        let mut body = Vec::new();
        if self.maybe_torn {
            body.push(b'\n');
        }
        body.extend(lines_of(entries));
        let before = file.metadata().map(|m| m.len());
        let written = file
            .write_all(&body)
            .and_then(|()| if self.sync { file.sync_data() } else { Ok(()) });
        if written.is_err() {
            self.maybe_torn = before.and_then(|len| file.set_len(len)).is_err();
        } else {
            self.maybe_torn = false;
        }
        written.with_context(|| format!("journal {}", self.dir.describe()))
    }
}

pub(super) async fn write_segments(
    mut writer: SegmentWriter,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_SEGMENT_ENTRIES {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let entries: Vec<Entry> = batch.iter().map(|p| p.entry.clone()).collect();
        writer.write_until_durable(&entries).await;
        for p in batch {
            let _ = p.done.send(());
        }
    }
}
