//! Who runs on an output root. Each worker slot (`--worker I/N`; an ordinary run is 0/1)
//! holds a lease under `<root>/_leases/`, a [claim](crate::run::claim) renewed while it runs.
//! Work itself is claimed unit by unit, so processes of any slots share it safely; the slot
//! lease keeps two processes off one slot's share of the job's budget, caps and rates. A
//! second process taking a live slot is refused, told who holds it and since when; a slot
//! whose holder is gone is taken over (see [`crate::run::claim`] for how "gone" is judged).
//!
//! A claim excludes only because the store refuses a second create of one object. Some
//! S3-compatible servers ignore `If-None-Match: *` and overwrite instead; on those two
//! processes would share a slot unnoticed, so taking a lease checks the refusal once and
//! stops the run when the store does not give it.

use std::sync::Arc;

use object_store::{PutMode, PutOptions};

use crate::error::{Error, Result};
use crate::root::names::LEASES_DIR;
use crate::run::claim::{Claims, Held, Holder, LAPSE_SECS, Taken, unix_now};
use crate::run::worker::Worker;
use crate::storage::{Location, delete_if_exists};

/// A held lease; renewed with the process's other claims until released.
#[derive(Debug)]
pub struct Lease {
    claims: Arc<Claims>,
    path: object_store::path::Path,
    watch: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Takes `worker`'s slot on the root of `claims`, or fails naming who holds it. Unless
    /// `trust_single_writer`, fails too when the store does not refuse a second create.
    pub async fn acquire(
        claims: &Arc<Claims>,
        worker: Worker,
        trust_single_writer: bool,
    ) -> Result<Lease> {
        let root = claims.root();
        let path = root
            .child(LEASES_DIR)
            .path(&format!("worker-{}-of-{}.json", worker.index, worker.count));
        let existed = root.head(&path).await?.is_some();
        let held = match claims.take(&path).await? {
            (Taken::Mine, Some(held)) => held,
            (Taken::HeldBy(holder), _) => return Err(in_use(root, worker, &holder)),
            (Taken::Unguarded(what), _) => return Err(unguarded(root, &what)),
            (Taken::Mine, None) => {
                return Err(Error::Internal("a claim taken but not held".into()));
            }
        };
        if !existed && !trust_single_writer {
            check_second_create_refused(root, &path, claims.me()).await?;
        }
        let watch = tokio::spawn(exit_when_lost(root.clone(), path.clone(), held));
        Ok(Lease {
            claims: Arc::clone(claims),
            path,
            watch,
        })
    }

    /// How many processes run on the root (leases renewed lately, this one's included) and
    /// this one's rank among them, by slot name: what the job's caps and rates are divided
    /// by. One listing, no reads: a process killed without giving its lease back counts until
    /// the lease lapses, which errs on the side of the servers.
    pub fn processes(&self) -> Processes {
        Processes {
            root: self.claims.root().clone(),
            path: self.path.clone(),
        }
    }

    /// Gives the slot back, if it is still this process's.
    pub async fn release(self) -> Result<()> {
        self.watch.abort();
        self.claims.release(&self.path).await
    }
}

/// Counts the processes on a root, as seen from one lease (see [`Lease::processes`]).
#[derive(Debug, Clone)]
pub struct Processes {
    root: Location,
    path: object_store::path::Path,
}

impl Processes {
    /// (processes running, this one's rank among them).
    pub async fn count(&self) -> Result<(usize, usize)> {
        use futures::TryStreamExt;
        let root = &self.root;
        let dir = root.child(LEASES_DIR);
        let listed: Vec<object_store::ObjectMeta> =
            root.store.list(Some(&dir.path(""))).try_collect().await?;
        let now = unix_now();
        let mut live: Vec<String> = listed
            .into_iter()
            .filter(|m| m.location.as_ref().ends_with(".json"))
            .filter(|m| {
                m.location == self.path
                    || now.saturating_sub(m.last_modified.timestamp().max(0) as u64) < LAPSE_SECS
            })
            .map(|m| m.location.to_string())
            .collect();
        if !live.iter().any(|l| *l == self.path.as_ref()) {
            live.push(self.path.to_string());
        }
        live.sort();
        let rank = live
            .iter()
            .position(|l| *l == self.path.as_ref())
            .unwrap_or(0);
        Ok((live.len(), rank))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

/// Ends this process at once, as a kill would, when another process took its lease over
/// (this one was thought gone: stalled, cut off): its work so far is journaled and
/// published, and its taker carries on.
async fn exit_when_lost(root: Location, path: object_store::path::Path, held: Arc<Held>) {
    held.lost().await;
    tracing::error!(lease = %root.display(&path), "This worker's lease was taken over by another process, which now runs its slot; stopping.");
    std::process::exit(2);
}

/// The error of a slot held by `held`, alive.
fn in_use(root: &Location, worker: Worker, held: &Holder) -> Error {
    Error::Job(format!(
        "{} is in use: worker {}/{} of job '{}' has run there since {} on {} (pid {}), its lease renewed {} s ago. \
         Wait for it to finish, choose another --output, or run another worker (--worker I/N); \
         if that process is gone, its lease lapses {LAPSE_SECS} s after its last renewal",
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

/// Creates the lease just created a second time: the store must refuse. Otherwise the lease
/// is removed and the run stopped, since it could not keep a second process off this slot.
async fn check_second_create_refused(
    root: &Location,
    path: &object_store::path::Path,
    me: &Holder,
) -> Result<()> {
    // Not the lease's own bytes: a try cut off by the network is repeated, and a repeat
    // refused over identical bytes would count as having landed.
    let body = serde_json::to_vec_pretty(&serde_json::json!({
        "second_create_of": me.token,
        "must_be": "refused",
    }))
    .expect("JSON serialises");
    let create = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    match root.store.put_opts(path, body.into(), create).await {
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
pub fn unguarded(root: &Location, what: &str) -> Error {
    Error::Job(format!(
        "{} cannot hold claims: {what}. A claim keeps a second process off a worker slot or a unit \
         of work only because the store refuses a second create of one object; without that, two processes \
         could pay for the same calls and overwrite each other's parts. Use a store that \
         honours conditional writes (AWS S3, MinIO, R2, Azure Blob, GCS, a local disk; for S3 \
         unset AWS_CONDITIONAL_PUT=disabled), or, if you are sure no other process runs on \
         this output, pass --trust-single-writer",
        root.describe()
    ))
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
