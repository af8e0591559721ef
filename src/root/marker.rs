//! The marker a stage or shard publishes its output with, and how markers are read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::llm::reply::Usage;
use crate::prepare::ingest::IngestCounts;
use crate::root::names::{SUCCESS_MARKER, shard_marker_path};
use crate::storage::Location;
use crate::storage::{read_json, write_json};

/// What one stage did, written to its `_SUCCESS` marker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    /// Stage name.
    pub stage: String,
    /// Rows that entered (= kept + dropped).
    pub rows_in: u64,
    /// Rows in the stage's output.
    pub rows_out: u64,
    /// Dropped rows by reason.
    pub dropped: BTreeMap<String, u64>,
    /// LLM requests and tokens spent by the stage.
    pub llm: Usage,
    /// Documents read and lines skipped, for stages that read the input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<IngestCounts>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Fingerprint of the job's definition of the stage when it was written.
    #[serde(default)]
    pub fingerprint: String,
    /// Ids of the shards the counts cover.
    #[serde(default)]
    pub shards: Vec<String>,
    /// Digest of the upstream markers this output was computed from: when an upstream shard
    /// is redone (say, to retry failed rows), what was computed from it is redone too.
    #[serde(default)]
    pub upstream: String,
    /// Input shards only: of the rows dropped as `duplicate_across_files`, those dropped
    /// while the shard ran; the others were moved out of its parts by the pass after every
    /// shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_while_running: Option<u64>,
    /// Input shards only: shard id -> input of the shards whose kept copies made this one
    /// drop rows while it ran. If one of those inputs changes, the drops may no longer hold,
    /// so this shard is redone too.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outranked_by: BTreeMap<String, String>,
    /// Shards only: the name of the shard's response journal, derived from the input file it
    /// comes from rather than from its number, so a shard renumbered because another input
    /// file went away still finds the responses it paid for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<String>,
    /// The input stage only: a hash of its shards' markers as published, so a rerun finding
    /// the same markers skips the passes over the whole table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards_digest: Option<String>,
    /// Unix milliseconds when the marker was written: rows that failed are retried by
    /// processes started later, not redone at once by those running beside its writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_at_ms: Option<u64>,
}

impl StageStats {
    /// Adds another shard's counts to these.
    pub fn absorb(&mut self, other: &StageStats) {
        self.rows_in += other.rows_in;
        self.rows_out += other.rows_out;
        for (reason, n) in &other.dropped {
            *self.dropped.entry(reason.clone()).or_default() += n;
        }
        self.llm = self.llm.plus(&other.llm);
        self.seconds += other.seconds;
        if let (Some(mine), Some(theirs)) = (self.input.as_mut(), other.input.as_ref()) {
            mine.documents += theirs.documents;
            for (reason, n) in &theirs.skipped {
                *mine.skipped.entry(reason.clone()).or_default() += n;
            }
        }
    }

    /// A short hash of what the output holds (definition, what it was computed from, shards
    /// and counts, not timings), so what was computed from it can tell when it was redone
    /// differently, even from another input of the same size.
    pub fn version(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut key = serde_json::json!([
            self.fingerprint,
            self.upstream,
            self.shards,
            self.rows_in,
            self.rows_out,
            self.dropped
        ]);
        // Calls that failed in kept rows: redone with answers, the output differs although
        // no count does. (Only when there are some, so other versions stay as they were.)
        if self.llm.failures > 0
            && let Some(parts) = key.as_array_mut()
        {
            parts.push(self.llm.failures.into());
        }
        hex::encode(&Sha256::digest(key.to_string().as_bytes())[..12])
    }

    /// Whether the output stands for a process started at `started` (Unix ms): written under
    /// `fingerprint` from the upstream version `upstream`, and either without rows whose LLM
    /// call failed (a rerun retries those) or written since that process started, its failed
    /// rows left for a later run to retry rather than redone at once by every process.
    pub fn stands(&self, fingerprint: &str, upstream: &str, started: u64) -> bool {
        self.fingerprint == fingerprint
            && self.upstream == upstream
            && (self.failed() == 0 || self.written_at_ms.is_some_and(|at| at >= started))
    }

    /// Rows whose LLM call failed after every retry: those dropped as `llm_error`, and those
    /// a stage kept with the error in their call (a score with `score_reason = 'llm_error'`,
    /// dropped later as `no_score:llm_error`), whichever counts more.
    pub fn failed(&self) -> u64 {
        let dropped = self.dropped.get("llm_error").copied().unwrap_or(0);
        dropped.max(self.llm.failures)
    }
}

/// Reads the `_SUCCESS` marker of `stage` under `root`, or `None` when the stage is not complete.
pub async fn read_stage_stats(root: &Location, stage: &str) -> Result<Option<StageStats>> {
    read_json(root, &root.child(stage).path(SUCCESS_MARKER)).await
}

/// Publishes `stage` under `root` as complete, with its totals.
pub async fn write_stage_stats(root: &Location, stage: &str, stats: &StageStats) -> Result<()> {
    write_json(
        root,
        &root.child(stage).path(SUCCESS_MARKER),
        &stamped(stats),
    )
    .await
}

/// `stats`, marked as written now.
fn stamped(stats: &StageStats) -> StageStats {
    StageStats {
        written_at_ms: Some(crate::run::claim::unix_millis()),
        ..stats.clone()
    }
}

/// Reads the marker of shard `id` of `stage`, or `None` when the shard is not published.
pub async fn read_shard_stats(
    root: &Location,
    stage: &str,
    id: &str,
) -> Result<Option<StageStats>> {
    read_json(root, &shard_marker_path(&root.child(stage), id)).await
}

/// Publishes shard `id` of `stage`.
pub async fn write_shard_stats(
    root: &Location,
    stage: &str,
    id: &str,
    stats: &StageStats,
) -> Result<()> {
    write_json(
        root,
        &shard_marker_path(&root.child(stage), id),
        &stamped(stats),
    )
    .await
}
