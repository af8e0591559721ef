//! Requests cut off by the network, against a store that loses requests and replies on
//! demand: a conditional put repeated after its first try landed is success, a write by
//! someone else in between is still refused, and a delete is repeated only where that cannot
//! remove what another process made meanwhile.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use backforth::storage::steady::Steady;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result, UpdateVersion,
};

use super::block_on;

/// An in-memory store whose next writes or deletes fail as a reset connection does.
#[derive(Debug, Default, Clone)]
struct Lossy(Arc<Faults>);

#[derive(Debug, Default)]
struct Faults {
    inner: InMemory,
    /// Requests to fail before they are carried out.
    lose_requests: AtomicUsize,
    /// Requests to carry out and then fail.
    lose_replies: AtomicUsize,
    /// Conditional puts to carry out and then answer as object_store does when it repeated
    /// one itself (after a 5xx or a closed connection): refused.
    refuse_after_landing: AtomicUsize,
    /// Written by "another process" right after a request whose reply is lost.
    meddle: Mutex<Option<String>>,
    tries: AtomicUsize,
}

impl std::fmt::Display for Lossy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lossy")
    }
}

/// As object_store reports a reset connection, with the URL whole as Azure's batch delete
/// does, SAS token included.
fn reset() -> object_store::Error {
    let cause = std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "POST http://127.0.0.1:1/acct/c?comp=batch&sig=SECRETSIG in 2ms - connection reset",
    );
    object_store::Error::Generic {
        store: "Lossy",
        source: Box::new(HttpError::new(HttpErrorKind::Interrupted, cause)),
    }
}

fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Faults {
    /// Runs `op` as the network would: maybe not at all, maybe without its reply.
    async fn through<T>(
        &self,
        location: &Path,
        op: impl std::future::Future<Output = Result<T>> + Send,
    ) -> Result<T> {
        self.tries.fetch_add(1, Ordering::SeqCst);
        if take(&self.lose_requests) {
            return Err(reset());
        }
        let outcome = op.await;
        if outcome.is_ok() && take(&self.refuse_after_landing) {
            let path = location.to_string();
            let source = "the version named is no longer current".into();
            return Err(object_store::Error::Precondition { path, source });
        }
        if take(&self.lose_replies) {
            let other = self.meddle.lock().unwrap().take();
            if let Some(other) = other {
                self.inner.put(location, other.into_bytes().into()).await?;
            }
            return Err(reset());
        }
        outcome
    }
}

#[async_trait::async_trait]
impl ObjectStore for Lossy {
    async fn put_opts(
        &self,
        at: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.0
            .through(at, self.0.inner.put_opts(at, payload, opts))
            .await
    }
    async fn put_multipart_opts(
        &self,
        at: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.0.inner.put_multipart_opts(at, opts).await
    }
    async fn get_opts(&self, at: &Path, options: GetOptions) -> Result<GetResult> {
        self.0.inner.get_opts(at, options).await
    }
    async fn get_ranges(&self, at: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.0.inner.get_ranges(at, ranges).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let faults = Arc::clone(&self.0);
        locations
            .then(move |at| {
                let faults = Arc::clone(&faults);
                async move {
                    let at = at?;
                    // As the clouds do, unlike the in-memory store: a missing object is an error.
                    let delete = async {
                        faults.inner.head(&at).await?;
                        faults.inner.delete(&at).await
                    };
                    faults.through(&at, delete).await?;
                    Ok(at)
                }
            })
            .boxed()
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.0.inner.list(prefix)
    }
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.0.inner.list_with_offset(prefix, offset)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.0.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.0.inner.copy_opts(from, to, options).await
    }
    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.0.inner.rename_opts(from, to, options).await
    }
}

fn steady(lossy: &Lossy) -> Steady {
    Steady::new(Arc::new(lossy.clone()))
}

fn create() -> PutOptions {
    PutMode::Create.into()
}

fn text(store: &Lossy, at: &Path) -> String {
    let bytes = block_on(async { store.0.inner.get(at).await?.bytes().await }).unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A create or an update whose connection failed before or after the store carried it out
/// succeeds once, with the version that landed; a delete whose reply was lost is done.
#[test]
fn a_repeat_whose_first_try_landed_is_success() {
    let lossy = Lossy::default();
    let store = steady(&lossy);
    let at = Path::from("claims/unit.json");

    lossy.0.lose_requests.store(1, Ordering::SeqCst);
    lossy.0.lose_replies.store(1, Ordering::SeqCst);
    let made = block_on(store.put_opts(&at, "mine".into(), create())).unwrap();
    assert_eq!(text(&lossy, &at), "mine");
    assert_eq!(
        lossy.0.tries.load(Ordering::SeqCst),
        3,
        "lost, landed unanswered, refused"
    );

    lossy.0.lose_replies.store(1, Ordering::SeqCst);
    let update = PutOptions::from(PutMode::Update(UpdateVersion {
        e_tag: made.e_tag.clone(),
        version: made.version.clone(),
    }));
    let renewed = block_on(store.put_opts(&at, "mine, renewed".into(), update)).unwrap();
    assert_eq!(text(&lossy, &at), "mine, renewed");
    assert_ne!(
        renewed.e_tag, made.e_tag,
        "the version that landed is returned"
    );
}

/// When another process writes between a lost reply and the repeat, the repeat's refusal is
/// what the caller sees: its claim was not taken, its update not made.
#[test]
fn a_write_by_another_in_between_is_still_refused() {
    let lossy = Lossy::default();
    let store = steady(&lossy);
    let at = Path::from("claims/unit.json");

    lossy.0.lose_replies.store(1, Ordering::SeqCst);
    *lossy.0.meddle.lock().unwrap() = Some("theirs".into());
    let refused = block_on(store.put_opts(&at, "mine".into(), create())).unwrap_err();
    assert!(
        matches!(refused, object_store::Error::AlreadyExists { .. }),
        "{refused}"
    );
    assert_eq!(text(&lossy, &at), "theirs");

    let theirs = block_on(lossy.0.inner.head(&at)).unwrap();
    lossy.0.lose_replies.store(1, Ordering::SeqCst);
    *lossy.0.meddle.lock().unwrap() = Some("a third's".into());
    let update = PutOptions::from(PutMode::Update(UpdateVersion {
        e_tag: theirs.e_tag,
        version: theirs.version,
    }));
    let refused = block_on(store.put_opts(&at, "mine".into(), update)).unwrap_err();
    assert!(
        matches!(refused, object_store::Error::Precondition { .. }),
        "{refused}"
    );
    assert_eq!(text(&lossy, &at), "a third's");
}

/// A refusal or an error that is not a failed connection is not repeated.
#[test]
fn only_failed_connections_are_repeated() {
    let lossy = Lossy::default();
    let store = steady(&lossy);
    let at = Path::from("claims/unit.json");
    block_on(lossy.0.inner.put(&at, "theirs".into())).unwrap();
    let refused = block_on(store.put_opts(&at, "mine".into(), create())).unwrap_err();
    assert!(matches!(refused, object_store::Error::AlreadyExists { .. }));
    assert_eq!(lossy.0.tries.load(Ordering::SeqCst), 1);

    lossy.0.lose_requests.store(100, Ordering::SeqCst);
    let gave_up = block_on(store.put_opts(&Path::from("other"), "x".into(), create()));
    assert!(
        gave_up.is_err(),
        "a store that never answers is an error in the end"
    );
    assert_eq!(
        lossy.0.tries.load(Ordering::SeqCst),
        1 + 11,
        "ten repeats after the first"
    );
}

/// A delete whose reply was lost is repeated and done; a claim given back is deleted again
/// only after looking, so a claim another process created meanwhile stays; a delete that
/// keeps failing is an error that does not print the URL's query.
#[test]
fn a_delete_is_repeated_only_where_it_cannot_remove_another_s_object() {
    use backforth::run::claim::{Holder, give_back};
    use backforth::storage::{Location, delete_if_exists};

    let lossy = Lossy::default();
    let root = Location {
        store: Arc::new(lossy.clone()),
        store_url: url::Url::parse("s3://bucket").unwrap(),
        prefix: Path::from("out"),
    };
    let marker = root.path("scored/_SUCCESS");
    block_on(lossy.0.inner.put(&marker, "{}".into())).unwrap();
    lossy.0.lose_replies.store(1, Ordering::SeqCst);
    block_on(delete_if_exists(&root, &marker)).unwrap();
    assert!(block_on(lossy.0.inner.head(&marker)).is_err(), "deleted");
    assert_eq!(
        lossy.0.tries.load(Ordering::SeqCst),
        2,
        "landed unanswered, then gone"
    );

    let me = Holder::me("job");
    let claim = root.path("_claims/scored/00000.json");
    let mine = serde_json::to_string(&me).unwrap();
    let mut other = serde_json::to_value(&me).unwrap();
    other["token"] = "another process".into();
    let theirs = other.to_string();
    block_on(lossy.0.inner.put(&claim, mine.into_bytes().into())).unwrap();
    lossy.0.lose_replies.store(1, Ordering::SeqCst);
    *lossy.0.meddle.lock().unwrap() = Some(theirs.clone());
    assert!(
        block_on(give_back(&root, &claim, &me)).unwrap(),
        "given back"
    );
    assert_eq!(
        text(&lossy, &claim),
        theirs,
        "the claim made meanwhile stays"
    );

    lossy.0.lose_requests.store(100, Ordering::SeqCst);
    let failed = block_on(delete_if_exists(&root, &claim))
        .unwrap_err()
        .to_string();
    assert!(
        failed.contains("deleting s3://bucket/out/_claims"),
        "{failed}"
    );
    assert!(!failed.contains("SECRETSIG"), "{failed}");
}

/// A claim is stamped with the time it is taken, not the process's start: one taken late in
/// a long run does not look long gone to other machines. A renewal refused although it
/// landed (object_store repeated it) is still this process's claim.
#[test]
fn claims_are_stamped_when_taken_and_a_refused_renewal_looks_again() {
    use backforth::run::claim::{Holder, Seen, Taken, renew, take, unix_now};
    use backforth::storage::Location;

    let lossy = Lossy::default();
    let root = Location {
        store: Arc::new(Steady::new(Arc::new(lossy.clone()))),
        store_url: url::Url::parse("s3://bucket").unwrap(),
        prefix: Path::from("out"),
    };
    let claim = root.path("_claims/scored/00000.json");
    let mut me = Holder::me("job");
    (me.since, me.renewed) = (0, 0);
    let taken = block_on(take(&root, &claim, &me, false, &Seen::default())).unwrap();
    assert!(matches!(taken, Taken::Mine), "{taken:?}");
    let held: Holder = serde_json::from_str(&text(&lossy, &claim)).unwrap();
    assert!(held.renewed + 5 >= unix_now(), "stamped {}", held.renewed);

    lossy.0.refuse_after_landing.store(1, Ordering::SeqCst);
    assert!(
        block_on(renew(&root, &claim, &me)).unwrap(),
        "still this process's"
    );

    let mut other: serde_json::Value = serde_json::from_str(&text(&lossy, &claim)).unwrap();
    other["token"] = "another process".into();
    block_on(
        lossy
            .0
            .inner
            .put(&claim, other.to_string().into_bytes().into()),
    )
    .unwrap();
    assert!(!block_on(renew(&root, &claim, &me)).unwrap(), "taken over");
}
