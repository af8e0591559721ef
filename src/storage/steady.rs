//! A cloud store whose writes and deletes survive a dropped connection.
//!
//! object_store retries a request cut off in flight only when HTTP calls it idempotent, so a
//! conditional put (a claim, a compacted journal) or an Azure batch delete whose connection is
//! reset fails the whole run. Both are safe to repeat at our level: a delete that finds the
//! object gone is done, and a conditional put refused after a lost reply is ours when the
//! object now holds exactly the bytes we sent.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result,
};

/// Tries after the first for a request whose connection failed; object_store has already
/// retried what it could by then, so a few more, spaced out, are enough.
const RETRIES: u32 = 4;

/// Wait before the first retry; doubled for each one after.
const FIRST_WAIT: Duration = Duration::from_millis(200);

/// `inner` with conditional puts and deletes retried when their connection fails.
#[derive(Debug)]
pub struct Steady {
    inner: Arc<dyn ObjectStore>,
}

impl Steady {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self { inner }
    }

    /// Puts `payload` at `location`, again after a lost connection; a refusal that follows a
    /// lost reply is success when the object holds `payload` (our first try landed).
    async fn put_steadily(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let mut lost_reply = false;
        let mut attempt = 0;
        loop {
            match self
                .inner
                .put_opts(location, payload.clone(), opts.clone())
                .await
            {
                Err(e) if attempt < RETRIES && cut_off(&e) => {
                    lost_reply = true;
                    attempt += 1;
                    pause(location, attempt, &e).await;
                }
                Err(
                    e @ (object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }),
                ) if lost_reply => {
                    return match self.holding(location, &payload).await? {
                        Some(landed) => Ok(landed),
                        None => Err(e),
                    };
                }
                done => return done,
            }
        }
    }

    /// What the object at `location` is, when it holds exactly `payload`.
    async fn holding(&self, location: &Path, payload: &PutPayload) -> Result<Option<PutResult>> {
        let got = match self.inner.get(location).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let landed = PutResult {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let held = got.bytes().await?;
        let sent: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
        Ok((held.as_ref() == sent.as_slice()).then_some(landed))
    }
}

/// Deletes `location`, again after a lost connection; gone after a lost reply is deleted.
async fn delete_steadily(inner: Arc<dyn ObjectStore>, location: Path) -> Result<Path> {
    let mut attempt = 0;
    loop {
        let once = futures::stream::iter([Ok(location.clone())]).boxed();
        let outcome = inner
            .delete_stream(once)
            .next()
            .await
            .unwrap_or_else(|| Ok(location.clone()));
        match outcome {
            Err(e) if attempt < RETRIES && cut_off(&e) => {
                attempt += 1;
                pause(&location, attempt, &e).await;
            }
            Err(object_store::Error::NotFound { .. }) if attempt > 0 => return Ok(location),
            done => return done,
        }
    }
}

/// True when `e` is a connection that failed before a reply came, not a reply refusing.
fn cut_off(e: &object_store::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cause {
        if let Some(http) = err.downcast_ref::<HttpError>() {
            return http.kind() != HttpErrorKind::Decode;
        }
        cause = err.source();
    }
    false
}

/// Waits before retry `attempt` on `location`, saying why.
async fn pause(location: &Path, attempt: u32, e: &object_store::Error) {
    let wait = FIRST_WAIT * 2u32.pow(attempt - 1);
    let wait = wait.mul_f64(0.5 + fastrand::f64());
    tracing::warn!(
        object = %location,
        attempt,
        "The store's connection failed ({e}); trying again in {} ms.",
        wait.as_millis()
    );
    tokio::time::sleep(wait).await;
}

impl fmt::Display for Steady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

#[async_trait]
impl ObjectStore for Steady {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        match opts.mode {
            // object_store repeats a plain overwrite itself.
            PutMode::Overwrite => self.inner.put_opts(location, payload, opts).await,
            PutMode::Create | PutMode::Update(_) => {
                self.put_steadily(location, payload, opts).await
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let inner = Arc::clone(&self.inner);
        locations
            .then(move |location| {
                let inner = Arc::clone(&inner);
                async move { delete_steadily(inner, location?).await }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}
