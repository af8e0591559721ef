//! A cloud store whose conditional puts survive a dropped connection, and the rules for
//! repeating other requests that object_store leaves to its caller.
//!
//! object_store retries a request cut off in flight only when HTTP calls it idempotent, so a
//! conditional put (a claim, a compacted journal) or an Azure batch delete whose connection is
//! reset would fail the whole run. A conditional put is safe to repeat at our level: refused
//! after a lost reply, it is ours when the object now holds exactly the bytes we sent. A
//! delete is safe to repeat only where nothing else may create the object meanwhile, which
//! its caller knows (see `storage::delete_if_exists` and the claims' `give_back`).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result,
};

/// Tries after the first for a request whose connection failed, as many as object_store
/// makes of the requests it repeats itself.
const RETRIES: u32 = 10;

/// Wait before the first retry; doubled for each one after, up to [`LONGEST_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(100);

/// The longest wait between two tries.
const LONGEST_WAIT: Duration = Duration::from_secs(2);

/// No retry starts this long after the first try: a store that keeps timing out is an error
/// the run reports, not something to wait on for minutes per request.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// Counts the tries of one request cut off by the network.
#[derive(Debug)]
pub struct Tries {
    made: u32,
    started: Instant,
}

impl Default for Tries {
    fn default() -> Self {
        Self {
            made: 0,
            started: Instant::now(),
        }
    }
}

impl Tries {
    /// Whether `e` is worth another try; if so, waits first, saying why.
    pub async fn again(&mut self, location: &Path, e: &object_store::Error) -> bool {
        if !cut_off(e) || self.made >= RETRIES || self.started.elapsed() > GIVE_UP_AFTER {
            return false;
        }
        self.made += 1;
        let doubled = FIRST_WAIT.saturating_mul(1 << (self.made - 1).min(16));
        let wait = doubled.min(LONGEST_WAIT).mul_f64(0.5 + fastrand::f64());
        tracing::warn!(
            object = %location,
            attempt = self.made,
            "The store's connection failed ({}); trying again in {} ms.",
            crate::escape::hide_url_queries(&e.to_string()),
            wait.as_millis()
        );
        tokio::time::sleep(wait).await;
        true
    }

    /// Whether any try was cut off (so an earlier one may have been carried out).
    pub fn repeated(&self) -> bool {
        self.made > 0
    }
}

/// `inner` with conditional puts repeated when their connection fails.
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
        let mut tries = Tries::default();
        loop {
            match self
                .inner
                .put_opts(location, payload.clone(), opts.clone())
                .await
            {
                Err(
                    e @ (object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }),
                ) if tries.repeated() => {
                    return match self.holding(location, &payload).await? {
                        Some(landed) => Ok(landed),
                        None => Err(e),
                    };
                }
                Err(e) => {
                    if !tries.again(location, &e).await {
                        return Err(e);
                    }
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
        let mut rest = held.as_ref();
        for chunk in payload.iter() {
            match rest.strip_prefix(chunk.as_ref()) {
                Some(after) => rest = after,
                None => return Ok(None),
            }
        }
        Ok(rest.is_empty().then_some(landed))
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
        self.inner.delete_stream(locations)
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
