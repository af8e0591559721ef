//! Who runs on an output root. Each worker slot (`--worker I/N`; an ordinary run is 0/1)
//! holds a lease object under `<root>/_leases/`, renewed while it runs: a second process
//! taking the same slot would pay for the same calls and overwrite the same parts, so it is
//! refused, told who holds the slot and since when. A lease is taken over once its holder is
//! gone: on the same machine and in the same PID namespace (the kernel's boot id and the
//! namespace's inode, not the host name, which containers share) when its process no longer
//! exists or is another process since started under its pid; elsewhere when it has not been
//! renewed for `LEASE_SECS`. Taking over and renewing are conditional: on an object store the
//! write names the version read, on a local disk it is done under an exclusive lock of the
//! lease's `.lock` file; so of two processes taking over one lapsed lease one wins and the
//! other is refused, and a holder whose lease was taken over stops.
//!
//! The lease excludes only because the store refuses a second create of one object. Some
//! S3-compatible servers ignore `If-None-Match: *` and overwrite instead; on those two
//! processes would share a slot unnoticed, so taking a lease checks the refusal once and
//! stops the run when the store does not give it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::job_error;
use crate::root::names::LEASES_DIR;
use crate::run::worker::Worker;
use crate::storage::Location;
use crate::storage::{delete_if_exists, read_json, write_json};

/// A lease not renewed for this long is taken to belong to a dead process.
const LEASE_SECS: u64 = 120;
/// How often a holder renews its lease.
const RENEW_SECS: u64 = 30;

/// What a lease object says.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    job: String,
    /// Unix seconds.
    since: u64,
    /// Unix seconds of the last renewal.
    renewed: u64,
    /// The kernel's boot id, the PID namespace and the process's start time (clock ticks
    /// since boot): together with `pid`, who the holder is on its machine.
    #[serde(default)]
    boot_id: String,
    #[serde(default)]
    pid_ns: String,
    #[serde(default)]
    started: u64,
    /// Random, drawn when the lease is taken: what tells the holder its own lease.
    #[serde(default)]
    token: String,
}

/// A held lease; renewed in the background until released (or the process dies).
#[derive(Debug)]
pub struct Lease {
    root: Location,
    path: object_store::path::Path,
    token: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Takes `worker`'s slot on `root` for `job`, or fails naming who holds it. Unless
    /// `trust_single_writer`, fails too when the store does not refuse a second create.
    pub async fn acquire(
        root: &Location,
        worker: Worker,
        job: &str,
        trust_single_writer: bool,
    ) -> Result<Lease> {
        let path = root
            .child(LEASES_DIR)
            .path(&format!("worker-{}-of-{}.json", worker.index, worker.count));
        let now = unix_now();
        let pid = std::process::id();
        let me = Holder {
            host: host_name(),
            pid,
            job: job.to_string(),
            since: now,
            renewed: now,
            boot_id: boot_id(),
            pid_ns: pid_namespace(),
            started: start_time(pid).unwrap_or(0),
            token: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
        };
        let body = PutPayload::from(serde_json::to_vec_pretty(&me).expect("a lease serialises"));
        let _local = local_lock(root, &path)?;
        let created = root.store.put_opts(&path, body.clone(), create()).await;
        match created {
            Ok(_) if trust_single_writer => {}
            Ok(_) => check_second_create_refused(root, &path, body).await?,
            Err(object_store::Error::NotImplemented { .. }) if trust_single_writer => {
                write_json(root, &path, &me).await?;
            }
            Err(e @ object_store::Error::NotImplemented { .. }) => {
                return Err(unguarded(root, &e.to_string()));
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                take_over(root, &path, &me, worker, trust_single_writer).await?;
            }
            Err(e) => return Err(e.into()),
        }
        drop(_local);
        let token = me.token.clone();
        let renewal = tokio::spawn(renew(root.clone(), path.clone(), me));
        Ok(Lease {
            root: root.clone(),
            path,
            token,
            renewal,
        })
    }

    /// Gives the slot back, if it is still this process's.
    pub async fn release(mut self) -> Result<()> {
        self.renewal.abort();
        // A renewal under way could write the lease again after it is deleted.
        let _ = (&mut self.renewal).await;
        let _local = local_lock(&self.root, &self.path)?;
        match read_json::<Holder>(&self.root, &self.path).await? {
            Some(held) if held.token != self.token => {
                tracing::warn!(lease = %self.root.display(&self.path), "The lease was taken over by another process; left to it.");
                Ok(())
            }
            _ => delete_if_exists(&self.root, &self.path).await,
        }
    }
}

/// On a local disk, an exclusive lock of the lease's `.lock` file beside it, held while the
/// lease is read and written: so two processes taking over, renewing or releasing one lease
/// take turns. Nothing elsewhere (object stores decide by conditional writes).
fn local_lock(root: &Location, path: &object_store::path::Path) -> Result<Option<std::fs::File>> {
    if root.store_url.scheme() != "file" {
        return Ok(None);
    }
    let local = object_store::local::LocalFileSystem::new().path_to_filesystem(path)?;
    let lock = local.with_extension("json.lock");
    let shown = || format!("lease lock {}", lock.display());
    std::fs::create_dir_all(lock.parent().unwrap_or(&lock)).with_context(shown)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .with_context(shown)?;
    file.lock().with_context(shown)?;
    Ok(Some(file))
}

/// Takes the lease at `path` over from a holder that is gone, or fails naming the one that
/// is not. Conditional, so of two processes taking it over at once one wins: the write
/// names the version read (object stores), or it is done under the lease's lock (a local
/// disk, see [`local_lock`]).
async fn take_over(
    root: &Location,
    path: &object_store::path::Path,
    me: &Holder,
    worker: Worker,
    trust_single_writer: bool,
) -> Result<()> {
    let body = PutPayload::from(serde_json::to_vec_pretty(me).expect("a lease serialises"));
    for _ in 0..3 {
        let (held, version) = match root.store.get(path).await {
            Ok(got) => {
                let version = UpdateVersion {
                    e_tag: got.meta.e_tag.clone(),
                    version: got.meta.version.clone(),
                };
                let bytes = got.bytes().await?;
                (serde_json::from_slice::<Holder>(&bytes).ok(), version)
            }
            // Released meanwhile: take it as new.
            Err(object_store::Error::NotFound { .. }) => {
                match root.store.put_opts(path, body.clone(), create()).await {
                    Ok(_) => return Ok(()),
                    Err(object_store::Error::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(held) = &held
            && held.alive(unix_now())
        {
            return Err(in_use(root, worker, held));
        }
        tracing::warn!(lease = %root.display(path), "Taking over the lease of a process that is gone.");
        let update = PutOptions::from(PutMode::Update(version));
        match root.store.put_opts(path, body.clone(), update).await {
            Ok(_) => return Ok(()),
            // Another process took it over (or gave it back) first: see who.
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::NotFound { .. },
            ) => continue,
            Err(object_store::Error::NotImplemented { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if root.store_url.scheme() == "file" {
            // Under the lease's lock: no other process reads or writes it meanwhile.
            write_json(root, path, me).await?;
            return Ok(());
        }
        if trust_single_writer {
            write_json(root, path, me).await?;
            return Ok(());
        }
        return Err(unguarded(
            root,
            "it cannot replace an object only if it is still the version read",
        ));
    }
    match read_json::<Holder>(root, path).await? {
        Some(held) if held.token == me.token => Ok(()),
        Some(held) => Err(in_use(root, worker, &held)),
        None => job_error!(
            "{}: the lease of worker {}/{} changed hands three times while it was being taken over; run again",
            root.describe(),
            worker.index,
            worker.count
        ),
    }
}

/// The error of a slot held by `held`, alive.
fn in_use(root: &Location, worker: Worker, held: &Holder) -> Error {
    Error::Job(format!(
        "{} is in use: worker {}/{} of job '{}' has run there since {} on {} (pid {}), its lease renewed {} s ago. \
         Wait for it to finish, choose another --output, or run another worker (--worker I/N); \
         if that process is gone, its lease lapses {LEASE_SECS} s after its last renewal",
        root.describe(),
        worker.index,
        worker.count,
        held.job,
        utc(held.since),
        held.host,
        held.pid,
        unix_now().saturating_sub(held.renewed)
    ))
}

fn create() -> PutOptions {
    PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    }
}

/// Creates the lease just created a second time: the store must refuse. Otherwise the lease
/// is removed and the run stopped, since it could not keep a second process off this slot.
async fn check_second_create_refused(
    root: &Location,
    path: &object_store::path::Path,
    body: PutPayload,
) -> Result<()> {
    match root.store.put_opts(path, body, create()).await {
        Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(_) => {
            delete_if_exists(root, path).await?;
            Err(unguarded(
                root,
                &format!(
                    "a second create-if-absent write of {} succeeded instead of being refused",
                    root.display(path)
                ),
            ))
        }
    }
}

/// Why `root` cannot hold a lease (`what` failed), and the ways out.
fn unguarded(root: &Location, what: &str) -> Error {
    Error::Job(format!(
        "{} cannot hold a worker's lease: {what}. A lease keeps a second process off its worker slot \
         only because the store refuses a second create of one object; without that, two processes \
         could run the same slot, pay for the same calls and overwrite each other's parts. Use a store that \
         honours conditional writes (AWS S3, MinIO, R2, Azure Blob, GCS, a local disk; for S3 \
         unset AWS_CONDITIONAL_PUT=disabled), or, if you are sure no other process runs this \
         worker slot on this output, pass --trust-single-writer",
        root.describe()
    ))
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl Holder {
    /// Whether the holder may still be running: in this machine's PID namespace, whether its
    /// process is there (the same process: same start time); elsewhere, whether it renewed the
    /// lease lately. Host names are no evidence (containers share them, and each may run the
    /// tool as PID 1).
    fn alive(&self, now: u64) -> bool {
        let here = !self.boot_id.is_empty()
            && self.boot_id == boot_id()
            && !self.pid_ns.is_empty()
            && self.pid_ns == pid_namespace();
        if here {
            return self.pid != std::process::id() && start_time(self.pid) == Some(self.started);
        }
        now.saturating_sub(self.renewed) < LEASE_SECS
    }
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
/// process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields count from the last
    // ')'; the start time is field 22.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Renews the lease every [`RENEW_SECS`] while it is this process's. One another process
/// took over (this one was thought gone: stalled, cut off) ends this process at once, as a
/// kill would: its work so far is journaled and published, and its taker carries on.
async fn renew(root: Location, path: object_store::path::Path, mut me: Holder) {
    loop {
        tokio::time::sleep(Duration::from_secs(RENEW_SECS)).await;
        match renew_once(&root, &path, &mut me).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(lease = %root.display(&path), "This worker's lease was taken over by another process, which now runs its slot; stopping.");
                std::process::exit(2);
            }
            Err(e) => tracing::warn!(error = %e, "Could not renew the output root's lease."),
        }
    }
}

/// One renewal: false when the lease is no longer this process's.
async fn renew_once(
    root: &Location,
    path: &object_store::path::Path,
    me: &mut Holder,
) -> Result<bool> {
    let _local = local_lock(root, path)?;
    let got = match root.store.get(path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let version = UpdateVersion {
        e_tag: got.meta.e_tag.clone(),
        version: got.meta.version.clone(),
    };
    let held: Option<Holder> = serde_json::from_slice(&got.bytes().await?).ok();
    if held.is_none_or(|h| h.token != me.token) {
        return Ok(false);
    }
    me.renewed = unix_now();
    let body = PutPayload::from(serde_json::to_vec_pretty(&*me).expect("a lease serialises"));
    // Only over the version read: a taker's lease in between is not overwritten.
    match root
        .store
        .put_opts(
            path,
            body.clone(),
            PutOptions::from(PutMode::Update(version)),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(object_store::Error::Precondition { .. }) => Ok(false),
        // A local disk (under its lock) and stores without conditional writes.
        Err(object_store::Error::NotImplemented { .. }) => {
            write_json(root, path, &*me).await?;
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This machine's name, as the kernel knows it.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "an unknown host".to_string())
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}
