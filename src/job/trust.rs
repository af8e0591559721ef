//! What a shared job file may make the tool do: the variables it may name as keys, the
//! files it may read, the rates it may set. Anything beyond is the user's to allow, on the
//! command line or in the environment, never in the job.

use std::path::{Path, PathBuf};

use super::resolve_path;
use crate::error::Result;
use crate::job_error;

/// The least rate a job may set: one every ten minutes (a slower limit is no limit anyone
/// means, and a rate near zero would wait for ever).
const LEAST_RATE_PER_MINUTE: f64 = 0.1;

/// The rate `name` of role `role`, checked: a positive number of at least
/// [`LEAST_RATE_PER_MINUTE`].
pub(super) fn rate(role: &str, name: &str, value: Option<f64>) -> Result<Option<f64>> {
    match value {
        Some(v) if !v.is_finite() || v < LEAST_RATE_PER_MINUTE => job_error!(
            "[models.{role}] {name} = {v}: a rate is a number per minute of at least {LEAST_RATE_PER_MINUTE}; leave it out for no limit"
        ),
        other => Ok(other),
    }
}

/// Where the variables a job may name as `api_key_env` beyond the usual ones are listed
/// (comma-separated), outside any job file.
pub const KEY_VARS_ENV: &str = "BACKFORTH_KEY_VARS";

/// The variable `name` that role `role`'s key is read from, if a job may name it: one that
/// looks like an API key (`*_API_KEY`, `*_TOKEN`) or one the user listed in
/// [`KEY_VARS_ENV`]. A shared job file naming `AWS_SECRET_ACCESS_KEY` would otherwise send
/// that secret as a bearer token to the job author's endpoint.
pub(super) fn key_variable(role: &str, name: String) -> Result<String> {
    let looks_like_a_key = name.ends_with("_API_KEY") || name.ends_with("_TOKEN");
    if looks_like_a_key || listed_key_variable(&name) {
        return Ok(name);
    }
    job_error!(
        "[models.{role}] api_key_env = \"{name}\": a job may name only variables that look like API keys (*_API_KEY, *_TOKEN), so a shared job cannot send another secret to its endpoint. To send this one, list it outside the job file: {KEY_VARS_ENV}={name}"
    )
}

/// Whether the user listed `name` in [`KEY_VARS_ENV`], outside any job file.
pub(super) fn listed_key_variable(name: &str) -> bool {
    std::env::var(KEY_VARS_ENV).is_ok_and(|list| list.split(',').any(|v| v.trim() == name))
}

/// The job's folder and the folders the user allowed besides (`--allow-path`): where the
/// files a job reads (templates, schemas, SQL, benchmarks) may be. A shared job file must
/// not put `~/.aws/credentials` in every prompt.
pub(super) struct JobDir<'a> {
    pub(super) base: &'a Path,
    pub(super) allowed: &'a [PathBuf],
}

impl JobDir<'_> {
    /// The text of the local file `path` (see [`JobDir::confined`]) and where it was read;
    /// `what` names the setting in either error.
    pub(super) fn read(&self, path: &str, what: &str) -> Result<(PathBuf, String)> {
        let path = PathBuf::from(self.confined(path, what)?);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(e) => job_error!("{what} {}: {e}", path.display()),
        }
    }

    /// `path` (relative to the job's folder) resolved, if it is under the job's folder or an
    /// allowed one; URLs (benchmarks on a store) are left as they are. `what` names the
    /// setting for the error.
    pub(super) fn confined(&self, path: &str, what: &str) -> Result<String> {
        let resolved = match path.strip_prefix("file://") {
            Some(local) => local.to_string(),
            None => resolve_path(self.base, path),
        };
        if resolved.contains("://") {
            // A bucket is read with the user's credentials: only one the user allowed.
            let allowed = self
                .allowed
                .iter()
                .any(|a| within_url(&resolved, &a.to_string_lossy()));
            if allowed {
                return Ok(resolved);
            }
            return job_error!(
                "{what} = \"{path}\" is in an object store: a job reads only under its own folder. To read it, pass --allow-path {path}"
            );
        }
        // Symbolic links and `..` are judged where they lead; a path that does not exist is
        // judged as written (reading it fails later with its own error). Absolute first: a
        // job named without a folder has "" for one, which every path starts with.
        let real = |p: &Path| {
            let p = if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            };
            let absolute = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            std::fs::canonicalize(&absolute).unwrap_or(absolute)
        };
        let target = real(Path::new(&resolved));
        let inside = std::iter::once(self.base)
            .chain(self.allowed.iter().map(PathBuf::as_path))
            .any(|root| target.starts_with(real(root)));
        if inside {
            return Ok(resolved);
        }
        job_error!(
            "{what} = \"{path}\" is outside the job's folder {}: a job reads files only under its own folder, so a shared job cannot send yours to its endpoint. To read it, pass --allow-path {} (or move it beside the job)",
            real(self.base).display(),
            Path::new(&resolved)
                .parent()
                .unwrap_or(Path::new("/"))
                .display()
        )
    }
}

/// Whether `url` is `allowed` or below it: `s3://bucket` allows `s3://bucket/x`, not
/// `s3://bucket-other/x`.
fn within_url(url: &str, allowed: &str) -> bool {
    let allowed = allowed.trim_end_matches('/');
    url.strip_prefix(allowed)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}
