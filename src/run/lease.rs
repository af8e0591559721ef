//! Who runs on an output root. Each worker slot (`--worker I/N`; an ordinary run is 0/1)
//! holds a lease object under `<root>/_leases/`, renewed while it runs: a second process
//! taking the same slot would pay for the same calls and overwrite the same parts, so it is
//! refused, told who holds the slot and since when. A lease is taken over once its holder is
//! gone: on the same host when its process no longer exists, elsewhere when it has not been
//! renewed for `LEASE_SECS`.
//!
//! The lease excludes only because the store refuses a second create of one object. Some
//! S3-compatible servers ignore `If-None-Match: *` and overwrite instead; on those two
//! processes would share a slot unnoticed, so taking a lease checks the refusal once and
//! stops the run when the store does not give it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::{PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
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
}

/// A held lease; renewed in the background until released (or the process dies).
#[derive(Debug)]
pub struct Lease {
    root: Location,
    path: object_store::path::Path,
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
        let me = Holder {
            host: host_name(),
            pid: std::process::id(),
            job: job.to_string(),
            since: now,
            renewed: now,
        };
        let body = PutPayload::from(serde_json::to_vec_pretty(&me).expect("a lease serialises"));
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
                if let Some(held) = read_json::<Holder>(root, &path).await?
                    && held.alive(now)
                {
                    return job_error!(
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
                        now.saturating_sub(held.renewed)
                    );
                }
                tracing::warn!(lease = %root.display(&path), "Taking over the lease of a process that is gone.");
                write_json(root, &path, &me).await?;
            }
            Err(e) => return Err(e.into()),
        }
        let renewal = tokio::spawn(renew(root.clone(), path.clone(), me));
        Ok(Lease {
            root: root.clone(),
            path,
            renewal,
        })
    }

    /// Gives the slot back.
    pub async fn release(self) -> Result<()> {
        self.renewal.abort();
        delete_if_exists(&self.root, &self.path).await
    }
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
    /// Whether the holder may still be running.
    fn alive(&self, now: u64) -> bool {
        if self.host == host_name() {
            return std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
                && self.pid != std::process::id();
        }
        now.saturating_sub(self.renewed) < LEASE_SECS
    }
}

async fn renew(root: Location, path: object_store::path::Path, mut me: Holder) {
    loop {
        tokio::time::sleep(Duration::from_secs(RENEW_SECS)).await;
        me.renewed = unix_now();
        if let Err(e) = write_json(&root, &path, &me).await {
            tracing::warn!(error = %e, "Could not renew the output root's lease.");
        }
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
