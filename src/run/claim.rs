//! Claims: small objects under an output root saying which process works on something (a
//! worker slot's lease, a unit of work), renewed while it does. A claim is created only if
//! absent; one whose holder is gone is taken over by a conditional write; renewal and release
//! are conditional too, so a process never renews or deletes a claim another has taken.
//!
//! A holder counts as gone on the same machine and in the same PID namespace (the kernel's
//! boot id and the namespace's inode, not the host name, which containers share) when its
//! process no longer exists, is a zombie, or is another process since started under its pid;
//! elsewhere when this process has seen its claim unrenewed for [`LAPSE_SECS`] by its own
//! clock (so clocks that disagree between machines neither kill a live holder nor keep a dead
//! one), or when the claim says it was last renewed more than [`LONG_GONE_SECS`] ago. On an object store the conditional write names the
//! version read; on a local disk it is done under an exclusive lock of the folder's `.lock`
//! file, so two processes taking over one claim take turns and one of them wins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::error::{Context, Result};
use crate::storage::{Location, Tries, read_json, try_delete, write_json};

/// A claim not renewed for this long is taken to belong to a dead process.
pub const LAPSE_SECS: u64 = 120;
/// A claim whose own time of renewal is this old is taken over without first watching it
/// for [`LAPSE_SECS`] (a run resumed long after a crash); clocks may disagree by less.
pub const LONG_GONE_SECS: u64 = 1200;
/// How often a holder renews its claims.
const RENEW_SECS: u64 = 30;
/// Renewals a process has in flight at once.
const RENEWALS_AT_ONCE: usize = 16;
/// A renewal not done by then is given up until the next round, which starts on time.
const RENEWAL_DEADLINE: Duration = Duration::from_secs(20);

/// What a claim object says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    /// The machine's host name (shown, never trusted).
    pub host: String,
    /// The process id, in its own PID namespace.
    pub pid: u32,
    /// The job's name.
    pub job: String,
    /// Unix seconds when the claim was taken.
    pub since: u64,
    /// Unix seconds of the last renewal.
    pub renewed: u64,
    /// The kernel's boot id, the PID namespace and the process's start time (clock ticks
    /// since boot): together with `pid`, who the holder is on its machine.
    #[serde(default)]
    boot_id: String,
    #[serde(default)]
    pid_ns: String,
    #[serde(default)]
    started: u64,
    /// Random, drawn once per process: what tells a process its own claims.
    #[serde(default)]
    pub token: String,
}

impl Holder {
    /// This process, working on `job`.
    pub fn me(job: &str) -> Holder {
        let now = unix_now();
        let pid = std::process::id();
        Holder {
            host: host_name(),
            pid,
            job: job.to_string(),
            since: now,
            renewed: now,
            boot_id: boot_id(),
            pid_ns: pid_namespace(),
            started: start_time(pid).unwrap_or(0),
            token: process_token(),
        }
    }

    /// Whether the holder may still be running: in this machine's PID namespace, whether its
    /// process is there (the same process: same start time, not a zombie); elsewhere, whether
    /// its claim changed within the last [`LAPSE_SECS`] that this process watched it
    /// (`unchanged_for`) and its own time of renewal is not long gone. Host names are no
    /// evidence (containers share them, each may run as PID 1).
    pub fn alive(&self, now: u64, unchanged_for: Duration) -> bool {
        let here = !self.boot_id.is_empty()
            && self.boot_id == boot_id()
            && !self.pid_ns.is_empty()
            && self.pid_ns == pid_namespace()
            && self.started != 0;
        if here {
            return start_time(self.pid) == Some(self.started);
        }
        unchanged_for < Duration::from_secs(LAPSE_SECS)
            && now.saturating_sub(self.renewed) < LONG_GONE_SECS
    }

    /// What changes each time the holder renews.
    fn renewal(&self) -> String {
        format!("{}:{}:{}", self.token, self.since, self.renewed)
    }

    /// `pid N on HOST, renewed S s ago`.
    pub fn describe(&self) -> String {
        format!(
            "pid {} on {}, renewed {} s ago",
            self.pid,
            self.host,
            unix_now().saturating_sub(self.renewed)
        )
    }

    fn body(&self) -> PutPayload {
        PutPayload::from(serde_json::to_vec_pretty(self).expect("a claim serialises"))
    }
}

/// This process's token, drawn once.
fn process_token() -> String {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN
        .get_or_init(|| format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)))
        .clone()
}

/// When this process first saw each claim held by another in its present renewal, by its
/// own monotonic clock: a holder on another machine is judged gone by how long its claim
/// stayed the same here, not by comparing clocks.
#[derive(Debug, Default)]
pub struct Seen(Mutex<HashMap<Path, (String, std::time::Instant)>>);

impl Seen {
    /// Whether `held`, the holder of the claim at `path`, may still be running (see
    /// [`Holder::alive`]), judged now.
    pub fn alive(&self, path: &Path, held: &Holder) -> bool {
        held.alive(unix_now(), self.unchanged_for(path, held))
    }

    /// How long `held`'s claim at `path` has looked as it does now.
    pub fn unchanged_for(&self, path: &Path, held: &Holder) -> Duration {
        let mut seen = self.0.lock().expect("lock poisoned");
        let renewal = held.renewal();
        match seen.get(path) {
            Some((was, since)) if *was == renewal => since.elapsed(),
            _ => {
                seen.insert(path.clone(), (renewal, std::time::Instant::now()));
                Duration::ZERO
            }
        }
    }
}

/// What taking a claim found.
#[derive(Debug)]
pub enum Taken {
    /// The claim is this process's now.
    Mine,
    /// A live process holds it.
    HeldBy(Holder),
    /// The store wrote a second create-if-absent instead of refusing it: it cannot exclude.
    Unguarded(String),
}

/// Takes the claim at `path` for `me`: created if absent, taken over from a holder that is
/// gone, else who holds it. On a store without conditional writes (only with
/// `trust_single_writer`) it is written plainly.
pub async fn take(
    root: &Location,
    path: &Path,
    me: &Holder,
    trust_single_writer: bool,
    seen: &Seen,
) -> Result<Taken> {
    let _local = local_lock(root, path).await?;
    // Stamped now: a claim taken late in a long run must not look long gone at once.
    let now = unix_now();
    let me = &Holder {
        since: now,
        renewed: now,
        ..me.clone()
    };
    for _ in 0..3 {
        match root.store.put_opts(path, me.body(), create()).await {
            Ok(_) => return Ok(Taken::Mine),
            Err(object_store::Error::NotImplemented { .. }) if trust_single_writer => {
                write_json(root, path, me).await?;
                return Ok(Taken::Mine);
            }
            Err(e @ object_store::Error::NotImplemented { .. }) => {
                return Ok(Taken::Unguarded(e.to_string()));
            }
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let (held, version) = match root.store.get(path).await {
            Ok(got) => {
                let version = version_of(&got.meta);
                let bytes = got.bytes().await?;
                (serde_json::from_slice::<Holder>(&bytes).ok(), version)
            }
            // Given back meanwhile: create it again.
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        // This process's own claim (a give-back that failed, a create repeated inside
        // object_store) is written again too, so it carries the time it was taken.
        let ours = held.as_ref().is_some_and(|h| h.token == me.token);
        if let Some(held) = held.filter(|_| !ours) {
            if seen.alive(path, &held) {
                return Ok(Taken::HeldBy(held));
            }
            tracing::info!(claim = %root.display(path), "Taking over the claim of a process that is gone.");
        }
        let update = PutOptions::from(PutMode::Update(version));
        match root.store.put_opts(path, me.body(), update).await {
            Ok(_) => return Ok(Taken::Mine),
            // Another process took it over (or gave it back) first: look again.
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::NotFound { .. },
            ) => continue,
            Err(object_store::Error::NotImplemented { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // Under the folder's lock on a local disk: no other process reads or writes it meanwhile.
        if root.store_url.scheme() == "file" || trust_single_writer {
            write_json(root, path, me).await?;
            return Ok(Taken::Mine);
        }
        return Ok(Taken::Unguarded(
            "it cannot replace an object only if it is still the version read".to_string(),
        ));
    }
    Ok(match read_json::<Holder>(root, path).await? {
        Some(held) if held.token == me.token => Taken::Mine,
        Some(held) => Taken::HeldBy(held),
        None => Taken::HeldBy(me.clone()),
    })
}

/// Renews `me`'s claim at `path`: false when it is no longer this process's.
pub async fn renew(root: &Location, path: &Path, me: &Holder) -> Result<bool> {
    let _local = local_lock(root, path).await?;
    for _ in 0..3 {
        let got = match root.store.get(path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let version = version_of(&got.meta);
        let held: Option<Holder> = serde_json::from_slice(&got.bytes().await?).ok();
        let Some(held) = held.filter(|h| h.token == me.token) else {
            return Ok(false);
        };
        let renewed = Holder {
            renewed: unix_now(),
            since: held.since,
            ..me.clone()
        };
        // Only over the version read: a taker's claim in between is not overwritten.
        let update = PutOptions::from(PutMode::Update(version));
        match root.store.put_opts(path, renewed.body(), update).await {
            Ok(_) => return Ok(true),
            // Refused because another process took it over, because object_store repeated
            // this write after it landed (it does after a 5xx or a closed connection), or
            // because an earlier renewal of ours landed late: the claim says which.
            Err(object_store::Error::Precondition { .. }) => {
                match read_json::<Holder>(root, path).await? {
                    Some(h) if h.token == me.token && h.renewed == renewed.renewed => {
                        return Ok(true);
                    }
                    Some(h) if h.token == me.token => continue,
                    _ => return Ok(false),
                }
            }
            // A local disk (under its lock) and stores without conditional writes.
            Err(object_store::Error::NotImplemented { .. }) => {
                write_json(root, path, &renewed).await?;
                return Ok(true);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// Deletes `me`'s claim at `path` if it is still this process's; false when another process
/// had taken it. A delete cut off by the network is repeated only after looking again: the
/// first may have landed and another process created the claim since.
pub async fn give_back(root: &Location, path: &Path, me: &Holder) -> Result<bool> {
    let _local = local_lock(root, path).await?;
    let mut tries = Tries::default();
    loop {
        match read_json::<Holder>(root, path).await? {
            Some(held) if held.token != me.token => return Ok(tries.repeated()),
            None => return Ok(true),
            Some(_) => {}
        }
        if try_delete(root, path, &mut tries).await? {
            return Ok(true);
        }
    }
}

/// The claims this process holds, renewed together by one task every [`RENEW_SECS`]. A
/// claim another process took over (this one was thought gone: stalled, cut off) is marked
/// lost, and whoever works under it stops.
#[derive(Debug)]
pub struct Claims {
    root: Location,
    me: Holder,
    trust_single_writer: bool,
    held: Arc<Mutex<HashMap<Path, Arc<Held>>>>,
    seen: Seen,
    renewal: tokio::task::JoinHandle<()>,
}

/// One claim of this process.
#[derive(Debug, Default)]
pub struct Held {
    lost: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Held {
    /// True once another process has taken the claim over.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Resolves once the claim is lost.
    pub async fn lost(&self) {
        loop {
            let changed = self.changed.notified();
            if self.is_lost() {
                return;
            }
            changed.await;
        }
    }

    fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

impl Claims {
    /// The claims of this process (holding none yet) on `root`, for `job`.
    pub fn new(root: &Location, job: &str, trust_single_writer: bool) -> Arc<Claims> {
        let me = Holder::me(job);
        let held: Arc<Mutex<HashMap<Path, Arc<Held>>>> = Arc::default();
        let renewal = tokio::spawn(renew_all(root.clone(), me.clone(), Arc::clone(&held)));
        Arc::new(Claims {
            root: root.clone(),
            me,
            trust_single_writer,
            held,
            seen: Seen::default(),
            renewal,
        })
    }

    /// The root the claims are on.
    pub fn root(&self) -> &Location {
        &self.root
    }

    /// This process, as its claims name it.
    pub fn me(&self) -> &Holder {
        &self.me
    }

    /// Takes the claim at `path`; while held, it is renewed with the others.
    pub async fn take(&self, path: &Path) -> Result<(Taken, Option<Arc<Held>>)> {
        let taken = take(
            &self.root,
            path,
            &self.me,
            self.trust_single_writer,
            &self.seen,
        )
        .await?;
        let held = matches!(taken, Taken::Mine).then(|| {
            let held = Arc::new(Held::default());
            self.lock().insert(path.clone(), Arc::clone(&held));
            held
        });
        Ok((taken, held))
    }

    /// The live holder of the claim at `path`, if another process's.
    pub async fn holder_of(&self, path: &Path) -> Result<Option<Holder>> {
        let held = read_json::<Holder>(&self.root, path).await.ok().flatten();
        Ok(held.filter(|h| h.token != self.me.token && self.seen.alive(path, h)))
    }

    /// Gives the claim at `path` back (if it is still this process's).
    pub async fn release(&self, path: &Path) -> Result<()> {
        let held = self.lock().remove(path);
        if held.is_some_and(|h| h.is_lost()) {
            return Ok(());
        }
        if !give_back(&self.root, path, &self.me).await? {
            tracing::warn!(claim = %self.root.display(path), "A claim was taken over by another process; left to it.");
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Path, Arc<Held>>> {
        self.held.lock().expect("lock poisoned")
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Renews every claim in `held` every [`RENEW_SECS`]; one found to be no longer this
/// process's is lost. A renewal that fails (the store unreachable) is tried again at the next
/// round: the work goes on, and if another process took the claim over meanwhile, the next
/// renewal that gets through finds it lost.
async fn renew_all(root: Location, me: Holder, held: Arc<Mutex<HashMap<Path, Arc<Held>>>>) {
    let every = Duration::from_secs(RENEW_SECS);
    let mut rounds = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        rounds.tick().await;
        let claims: Vec<(Path, Arc<Held>)> = held
            .lock()
            .expect("lock poisoned")
            .iter()
            .map(|(p, h)| (p.clone(), Arc::clone(h)))
            .collect();
        // Side by side, each given up after a while: one renewal stuck on a slow store must
        // not keep the others, or the next round, waiting until they lapse.
        let renewals = claims
            .into_iter()
            .filter(|(_, claim)| !claim.is_lost())
            .map(|(path, claim)| {
                let (root, me) = (&root, &me);
                async move {
                    let renewed = tokio::time::timeout(RENEWAL_DEADLINE, renew(root, &path, me));
                    match renewed.await {
                        Ok(Ok(true)) => {}
                        Ok(Ok(false)) => claim.mark_lost(),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, claim = %root.display(&path), "Could not renew a claim; trying again in {RENEW_SECS} s.");
                        }
                        Err(_) => {
                            tracing::warn!(claim = %root.display(&path), "Renewing a claim took over {} s; trying again in {RENEW_SECS} s.", RENEWAL_DEADLINE.as_secs());
                        }
                    }
                }
            });
        futures::stream::iter(renewals)
            .buffer_unordered(RENEWALS_AT_ONCE)
            .collect::<()>()
            .await;
    }
}

/// On a local disk, an exclusive lock of the `.lock` file in the folder of `path`, held while
/// a claim (or a compacted journal) there is read and written, so processes taking over,
/// renewing or giving back claims take turns (this process's own tasks queue first, so no runtime thread blocks on a
/// lock another of its tasks holds). Nothing elsewhere: object stores decide by conditional
/// writes.
pub(crate) async fn local_lock(root: &Location, path: &Path) -> Result<Option<LocalLock>> {
    static IN_PROCESS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    if root.store_url.scheme() != "file" {
        return Ok(None);
    }
    let turn = IN_PROCESS.lock().await;
    let local = object_store::local::LocalFileSystem::new().path_to_filesystem(path)?;
    let folder = local.parent().map(std::path::Path::to_path_buf);
    let lock = folder.unwrap_or_default().join(".lock");
    let shown = || format!("claim lock {}", lock.display());
    std::fs::create_dir_all(lock.parent().unwrap_or(&lock)).with_context(shown)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .with_context(shown)?;
    file.lock().with_context(shown)?;
    Ok(Some(LocalLock {
        _file: file,
        _turn: turn,
    }))
}

/// A held local lock: the file lock, and this process's turn.
pub(crate) struct LocalLock {
    _file: std::fs::File,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

fn version_of(meta: &object_store::ObjectMeta) -> UpdateVersion {
    UpdateVersion {
        e_tag: meta.e_tag.clone(),
        version: meta.version.clone(),
    }
}

fn create() -> PutOptions {
    PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    unix_millis() / 1000
}

/// Unix milliseconds now.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The kernel's id of this boot (empty where there is none to read).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// This process's PID namespace, as `pid:[inode]` (empty where there is none to read).
fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|ns| ns.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// When process `pid` started, in clock ticks since boot; `None` when there is no such
/// process or it is a zombie (killed, not yet reaped: gone for our purposes).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces, parentheses and bytes that are not UTF-8:
    // fields count from the last ')'; the state is field 3, the start time field 22.
    let after = &stat[stat.iter().rposition(|b| *b == b')')? + 1..];
    let after = String::from_utf8_lossy(after);
    let mut fields = after.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// This machine's name, as the kernel knows it.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "an unknown host".to_string())
}
