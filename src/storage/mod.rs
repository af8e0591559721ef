//! Locations by URL: local paths, `file://`, `s3://`, `gs://`, `az://`, each resolved to an
//! `object_store` with credentials from the cloud's standard environment variables.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::Serialize;
use url::Url;

use crate::error::{Context, Error, Result};
use crate::job_error;

pub mod steady;

pub use steady::Tries;

/// The parts of an object-store URL, whichever form a user writes it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudUrl {
    /// `s3`, `gs` or `az` (Azure in any of its forms).
    pub scheme: &'static str,
    /// The Azure storage account, when the URL names it.
    pub account: Option<String>,
    /// The bucket or container.
    pub bucket: String,
    /// The path inside it, without leading or trailing `/`.
    pub prefix: String,
}

impl CloudUrl {
    /// Reads `s3://bucket/path`, `gs://bucket/path`, `az://container/path`,
    /// `abfs[s]://container@account.dfs.core.windows.net/path` and
    /// `https://account.blob.core.windows.net/container/path` (or `.dfs.`).
    pub fn parse(location: &str) -> Result<Self> {
        let url = Url::parse(location)
            .map_err(|e| Error::Job(format!("'{location}' is not a valid URL: {e}")))?;
        let host = url.host_str().unwrap_or_default().to_string();
        let path = url.path().trim_matches('/').to_string();
        let account_of = |host: &str| {
            [".blob.core.windows.net", ".dfs.core.windows.net"]
                .iter()
                .find_map(|suffix| host.strip_suffix(suffix))
                .map(str::to_string)
        };
        let (scheme, account, bucket, prefix) = match url.scheme() {
            "s3" => ("s3", None, host, path),
            "gs" => ("gs", None, host, path),
            "az" => ("az", None, host, path),
            "abfs" | "abfss" => match url.username() {
                "" => ("az", None, host, path),
                container => (
                    "az",
                    account_of(&host).or(Some(host.clone())),
                    container.to_string(),
                    path,
                ),
            },
            "https" if account_of(&host).is_some() => {
                let (container, rest) = path.split_once('/').unwrap_or((path.as_str(), ""));
                (
                    "az",
                    account_of(&host),
                    container.to_string(),
                    rest.to_string(),
                )
            }
            other => {
                return job_error!(
                    "'{location}': scheme '{other}' is not supported (use a path, file://, s3://, gs://, az://, abfss://container@account.dfs.core.windows.net/ or https://account.blob.core.windows.net/container/)"
                );
            }
        };
        if bucket.is_empty() {
            return job_error!("'{location}' names no bucket or container");
        }
        Ok(Self {
            scheme,
            account,
            bucket,
            prefix,
        })
    }
}

/// A directory-like place: a store, the URL DataFusion knows it by, and a prefix inside it.
#[derive(Debug, Clone)]
pub struct Location {
    /// The store holding the data.
    pub store: Arc<dyn ObjectStore>,
    /// The store's URL (`file:///`, `s3://bucket`), as registered with DataFusion.
    pub store_url: Url,
    /// The prefix inside the store.
    pub prefix: Path,
}

impl Location {
    /// Parses a path or URL.
    pub fn parse(location: &str) -> Result<Self> {
        if !location.contains("://") || location.starts_with("file://") {
            let raw = location.strip_prefix("file://").unwrap_or(location);
            let path = absolute(FsPath::new(raw))?;
            let prefix = Path::from_absolute_path(&path)
                .map_err(|e| Error::Job(format!("path {}: {e}", path.display())))?;
            return Ok(Self {
                store: Arc::new(LocalFileSystem::new()),
                store_url: Url::parse("file:///").expect("valid URL"),
                prefix,
            });
        }
        let CloudUrl {
            scheme,
            account,
            bucket,
            prefix,
        } = CloudUrl::parse(location)?;
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&bucket)
                    .build()
                    .map_err(|e| Error::Job(format!("S3 store for {location}: {e}")))?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&bucket)
                    .build()
                    .map_err(|e| Error::Job(format!("GCS store for {location}: {e}")))?,
            ),
            _ => {
                let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(&bucket);
                if let Some(account) = &account {
                    builder = builder.with_account(account);
                }
                Arc::new(builder.build().map_err(|e| {
                    Error::Job(format!(
                        "Azure store for {location}: {e} (the account comes from the URL or AZURE_STORAGE_ACCOUNT_NAME)"
                    ))
                })?)
            }
        };
        let store: Arc<dyn ObjectStore> = Arc::new(steady::Steady::new(store));
        let store_url = Url::parse(&format!("{scheme}://{bucket}")).map_err(|e| {
            Error::Job(format!(
                "'{location}': bucket '{bucket}' is not a valid host: {e}"
            ))
        })?;
        Ok(Self {
            store,
            store_url,
            prefix: Path::from(prefix.as_str()),
        })
    }

    /// A location below this one.
    pub fn child(&self, name: &str) -> Location {
        Location {
            store: Arc::clone(&self.store),
            store_url: self.store_url.clone(),
            prefix: self.path(name),
        }
    }

    /// The path of `name` below the prefix.
    pub fn path(&self, name: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        path
    }

    /// URL of this location as a directory (trailing `/`), for DataFusion listing tables.
    pub fn dir_url(&self) -> String {
        let base = self.store_url.as_str().trim_end_matches('/');
        format!("{base}/{}/", self.prefix.as_ref())
    }

    /// Human-readable form of this location for messages: a path or a URL.
    pub fn describe(&self) -> String {
        self.display(&self.prefix)
    }

    /// Human-readable form of `path` for messages: a filesystem path or a URL.
    pub fn display(&self, path: &Path) -> String {
        if self.store_url.scheme() == "file" {
            format!("/{path}")
        } else {
            format!("{}/{path}", self.store_url.as_str().trim_end_matches('/'))
        }
    }

    /// True when an object exists at `path`.
    pub async fn exists(&self, path: &Path) -> Result<bool> {
        Ok(self.head(path).await?.is_some())
    }

    /// The object at `path`, or `None` when there is none. Only "not found" means absent: a
    /// denied or failed request is an error, never taken for a missing object.
    pub async fn head(&self, path: &Path) -> Result<Option<object_store::ObjectMeta>> {
        match self.store.head(path).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::failed(self.display(path), e)),
        }
    }

    /// Deletes every object under this location.
    pub async fn delete_all(&self) -> Result<()> {
        let objects: Vec<_> = self.store.list(Some(&self.prefix)).try_collect().await?;
        for meta in objects {
            delete_if_exists(self, &meta.location).await?;
        }
        Ok(())
    }
}

/// The absolute form of `path` with `.` and `..` resolved lexically (object store paths
/// allow neither).
fn absolute(path: &FsPath) -> Result<PathBuf> {
    use std::path::Component;
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// One input file: where it is and how to decode it.
#[derive(Debug, Clone)]
pub struct InputFile {
    /// The store holding it.
    pub store: Arc<dyn ObjectStore>,
    /// Its path in the store.
    pub path: Path,
    /// Path or URL as shown in messages.
    pub display: String,
    /// Its path under the input root (`sub/x.jsonl`): what ids derived from file and line
    /// start with, unique across the input, the same wherever the input is mounted.
    pub key: String,
    /// What names its responses' journal: its path under its own `--input`, unchanged when
    /// other inputs are added (see [`keys_under_common_root`]).
    pub journal_key: String,
    /// How it is encoded.
    pub format: InputFormat,
    /// Size in bytes, part of what identifies the file's content between runs.
    pub size: u64,
    /// The store's version of the content (ETag, else modification time): with the size,
    /// what tells a file edited in place.
    pub version: String,
    /// For a large Parquet file cut into several shards: the row groups this one reads.
    pub row_groups: Option<std::ops::Range<usize>>,
}

impl InputFile {
    /// A name for the responses of this file's rows that stays the same when other files
    /// come or go: a short hash of its key and row groups.
    pub fn journal_name(&self) -> String {
        use sha2::{Digest, Sha256};
        let id = match &self.row_groups {
            Some(r) => format!("{}#{}..{}", self.journal_key, r.start, r.end),
            None => self.journal_key.clone(),
        };
        hex::encode(&Sha256::digest(id.as_bytes())[..8])
    }

    /// The file, and its row groups when it is one shard of a larger file.
    pub fn describe(&self) -> String {
        match &self.row_groups {
            Some(r) => format!("{} [row groups {}..{}]", self.display, r.start, r.end),
            None => self.display.clone(),
        }
    }
}

/// Encodings of document files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// JSON lines, uncompressed.
    Jsonl,
    /// JSON lines, gzip.
    JsonlGzip,
    /// JSON lines, zstd.
    JsonlZstd,
    /// Parquet.
    Parquet,
}

impl InputFormat {
    /// Infers the format from a file name, or `None` when it is not a document file.
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        let json = |stem: &str| stem.ends_with(".jsonl") || stem.ends_with(".json");
        if lower.ends_with(".parquet") {
            Some(Self::Parquet)
        } else if let Some(stem) = lower.strip_suffix(".gz") {
            json(stem).then_some(Self::JsonlGzip)
        } else if let Some(stem) = lower.strip_suffix(".zst").or(lower.strip_suffix(".zstd")) {
            json(stem).then_some(Self::JsonlZstd)
        } else {
            json(&lower).then_some(Self::Jsonl)
        }
    }
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Expands one `--input` value (file, directory, glob, or URL prefix) into files, sorted.
pub async fn list_inputs(spec: &str) -> Result<Vec<InputFile>> {
    let is_url = spec.contains("://") && !spec.starts_with("file://");
    let (base, pattern) = match spec.rsplit_once('/') {
        Some((dir, name)) if has_glob(name) && !has_glob(dir) => (dir.to_string(), Some(name)),
        _ if has_glob(spec) && !is_url => return list_local_glob(spec),
        _ => (spec.to_string(), None),
    };
    if has_glob(&base) {
        return job_error!(
            "input '{spec}': wildcards are supported in the last path component only for URLs"
        );
    }
    let location = Location::parse(&base)?;
    if pattern.is_none() {
        // A single file: take it whatever its extension says, so odd names still work.
        // Denied, unreachable, ...: say so, rather than that nothing matched.
        let head = location
            .head(&location.prefix)
            .await
            .with_context(|| format!("input '{spec}'"))?;
        if let Some(meta) = head {
            let name = meta.location.filename().unwrap_or_default();
            return Ok(vec![InputFile {
                store: Arc::clone(&location.store),
                display: location.display(&meta.location),
                key: name.to_string(),
                journal_key: name.to_string(),
                format: InputFormat::from_name(name).unwrap_or(InputFormat::Jsonl),
                size: meta.size,
                version: version_of(&meta),
                row_groups: None,
                path: meta.location,
            }]);
        }
    }
    let pattern = pattern
        .map(|p| glob::Pattern::new(p).map_err(|e| Error::Job(format!("input '{spec}': {e}"))))
        .transpose()?;
    let mut objects: Vec<_> = location
        .store
        .list(Some(&location.prefix))
        .try_collect()
        .await?;
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    let files: Vec<InputFile> = objects
        .into_iter()
        .filter_map(|meta| {
            let name = meta.location.filename()?.to_string();
            if name.starts_with(['.', '_']) {
                return None;
            }
            if let Some(p) = &pattern {
                // The pattern applies to the file name only, not to sub-directories.
                let relative = meta.location.prefix_match(&location.prefix)?.count();
                if relative != 1 || !p.matches(&name) {
                    return None;
                }
            }
            let key = meta
                .location
                .prefix_match(&location.prefix)?
                .map(|part| part.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/");
            Some(InputFile {
                store: Arc::clone(&location.store),
                display: location.display(&meta.location),
                journal_key: key.clone(),
                key,
                format: InputFormat::from_name(&name)?,
                size: meta.size,
                version: version_of(&meta),
                row_groups: None,
                path: meta.location,
            })
        })
        .collect();
    if files.is_empty() {
        return job_error!(
            "input '{spec}' matches no document files (.jsonl, .json, .jsonl.gz, .jsonl.zst, .parquet)"
        );
    }
    Ok(files)
}

fn list_local_glob(spec: &str) -> Result<Vec<InputFile>> {
    // Keys are taken under the directory before the first wildcard.
    let base: std::path::PathBuf = std::path::Path::new(spec)
        .components()
        .take_while(|c| !has_glob(&c.as_os_str().to_string_lossy()))
        .collect();
    let paths = glob::glob(spec).map_err(|e| Error::Job(format!("input '{spec}': {e}")))?;
    let mut files = Vec::new();
    for entry in paths {
        let path = entry.map_err(|e| Error::Job(format!("input '{spec}': {e}")))?;
        if !path.is_file() {
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(format) = InputFormat::from_name(&name) else {
            continue;
        };
        let location = Location::parse(&path.to_string_lossy())?;
        let key = path
            .strip_prefix(&base)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        files.push(InputFile {
            store: location.store,
            display: path.display().to_string(),
            journal_key: key.clone(),
            key,
            format,
            size: std::fs::metadata(&path)?.len(),
            version: std::fs::metadata(&path)?
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(String::new(), |d| format!("mtime {}", d.as_nanos())),
            row_groups: None,
            path: location.prefix,
        });
    }
    if files.is_empty() {
        return job_error!("input '{spec}' matches no document files");
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Makes the keys of files matched by several inputs unique: each becomes the file's path
/// under the deepest directory holding them all (`a/x.jsonl`, `b/x.jsonl` for inputs `a/`
/// and `b/`). The files of one input keep their keys under it.
///
/// Journal keys stay what each input gave, so adding an input renames no journal: a file
/// whose journal key an earlier file (in input order) already has gets its full path or URL
/// instead.
pub fn keys_under_common_root(files: &mut [InputFile]) {
    let mut taken = std::collections::HashSet::new();
    for file in files.iter_mut() {
        if !taken.insert(file.journal_key.clone()) {
            file.journal_key = file.display.clone();
            taken.insert(file.journal_key.clone());
        }
    }
    let dirs: Vec<Vec<&str>> = files
        .iter()
        .map(|f| {
            let parts: Vec<&str> = f.display.split('/').collect();
            parts[..parts.len().saturating_sub(1)].to_vec()
        })
        .collect();
    let Some(first) = dirs.first() else { return };
    let common = dirs.iter().fold(first.len(), |n, d| {
        n.min(d.len())
            .min(first.iter().zip(d).take_while(|(a, b)| a == b).count())
    });
    for file in files.iter_mut() {
        let parts: Vec<&str> = file.display.split('/').collect();
        file.key = parts[common..].join("/");
    }
}

/// What identifies an object's content besides its size: its ETag, else its modification time.
fn version_of(meta: &object_store::ObjectMeta) -> String {
    match &meta.e_tag {
        Some(tag) => format!("etag {tag}"),
        None => format!(
            "mtime {}",
            meta.last_modified.timestamp_nanos_opt().unwrap_or(0)
        ),
    }
}

/// Flushes the files `parts` (names under `dir`) and the folder itself to the device, when
/// `dir` is on the local disk: what a marker written next points at survives a power loss.
/// Object stores need nothing (a put is durable when it returns).
pub fn sync_local(dir: &Location, parts: &[String]) -> Result<()> {
    if dir.store_url.scheme() != "file" {
        return Ok(());
    }
    let local = object_store::local::LocalFileSystem::new();
    let folder = local.path_to_filesystem(&dir.prefix)?;
    for part in parts {
        let file = local.path_to_filesystem(&dir.path(part))?;
        std::fs::File::open(&file)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", file.display()))?;
    }
    std::fs::File::open(&folder)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {}", folder.display()))?;
    Ok(())
}

/// Deletes the object at `path`; an object already gone is fine. A delete cut off by the
/// network is repeated, which is right only where no other process creates `path` meanwhile
/// (claims, which others do create, repeat theirs with a look first).
pub async fn delete_if_exists(root: &Location, path: &object_store::path::Path) -> Result<()> {
    let mut tries = Tries::default();
    while !try_delete(root, path, &mut tries).await? {}
    Ok(())
}

/// One try at deleting `path`: true once it is gone; false when the try was cut off by the
/// network and, after a wait, may be made again; an error when `tries` are spent or the
/// store refused.
pub async fn try_delete(
    root: &Location,
    path: &object_store::path::Path,
    tries: &mut Tries,
) -> Result<bool> {
    match root.store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
        Err(e) => {
            if tries.again(path, &e).await {
                Ok(false)
            } else {
                Err(not_deleted(root, path, &e))
            }
        }
    }
}

/// The error of a delete of `path` that failed: Azure's batch delete names its URL whole,
/// so queries (a SAS token) are hidden.
fn not_deleted(root: &Location, path: &object_store::path::Path, e: &object_store::Error) -> Error {
    Error::failed(
        format!("deleting {}", root.display(path)),
        crate::escape::hide_url_queries(&e.to_string()),
    )
}

/// Reads the JSON object at `path`, or `None` when there is none.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    root: &Location,
    path: &object_store::path::Path,
) -> Result<Option<T>> {
    match root.store.get(path).await {
        Ok(got) => {
            let bytes = got.bytes().await?;
            serde_json::from_slice(&bytes).map(Some).with_context(|| {
                format!(
                    "{}: unreadable marker (delete it to redo that work)",
                    root.display(path)
                )
            })
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes `value` as the JSON object at `path`.
pub async fn write_json<T: Serialize>(
    root: &Location,
    path: &object_store::path::Path,
    value: &T,
) -> Result<()> {
    let body = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Internal(format!("marker serialisation: {e}")))?;
    root.store.put(path, PutPayload::from(body)).await?;
    Ok(())
}
