//! Fingerprints of what determines each stage's output, and the run manifest that records
//! them under the output root, so resuming with a changed prompt, model or SQL is refused with
//! a message saying what changed (unless the user asks to continue).

use std::collections::BTreeMap;

use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Context, Error, Result};
use crate::job::catalog::{DOCUMENTS, NEAR_DUPLICATES};
use crate::job::{Job, ModelSpec};
use crate::job_error;
use crate::root::marker::read_stage_stats;
use crate::root::names::{JOB_FILE, SHARDS_DIR, SUCCESS_MARKER};
use crate::storage::Location;
use crate::storage::{delete_if_exists, write_json};

/// Name of the manifest under the output root.
pub const MANIFEST: &str = "_manifest.json";

/// What a stage's output depends on, part by part (`sql`, `prompt of rewrite`, ...), each as
/// a hash; equal fingerprints mean equal results.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Hash of each part.
    pub parts: BTreeMap<String, String>,
}

impl Fingerprint {
    fn add(&mut self, part: impl Into<String>, value: &impl Serialize) {
        let json = serde_json::to_vec(value).expect("job values serialise");
        self.parts
            .insert(part.into(), hex::encode(&Sha256::digest(&json)[..12]));
    }

    /// One hash over every part.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(&self.parts).expect("maps serialise");
        hex::encode(&Sha256::digest(&json)[..12])
    }

    /// Names of the parts that differ from `other`.
    pub fn changes(&self, other: &Fingerprint) -> Vec<String> {
        let mut names: Vec<&String> = self.parts.keys().chain(other.parts.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|n| self.parts.get(*n) != other.parts.get(*n))
            .cloned()
            .collect()
    }
}

/// The parts of a model that change its answers (not its endpoint, cap or timeouts).
fn model_identity(m: &ModelSpec) -> serde_json::Value {
    let mut identity = serde_json::json!({
        "model": m.model, "api": m.api, "temperature": m.temperature, "top_p": m.top_p,
        "extra": m.extra,
    });
    // Only when set, so the fingerprints of jobs without it stay as they were.
    if let Some(seed) = m.seed {
        identity["seed"] = seed.into();
    }
    identity
}

/// Fingerprints each stage of `job` given its rendered SQL and the tables it reads.
pub fn fingerprint_stages(
    job: &Job,
    stages: &[(String, String, Vec<String>)],
) -> BTreeMap<String, Fingerprint> {
    let mut out: BTreeMap<String, Fingerprint> = BTreeMap::new();
    for (name, sql, tables) in stages {
        let mut fp = Fingerprint::default();
        fp.add("sql", sql);
        if let Some(decontamination) = &job.decontamination
            && crate::prepare::decontaminate::checks_benchmarks(sql)
        {
            fp.add("decontamination", decontamination);
        }
        for f in job.functions_in(sql) {
            fp.add(
                format!("prompt of {}", f.name),
                &(&f.template, &f.system, f.max_tokens),
            );
            // Only when set, so the fingerprints of plain functions stay as they were.
            if f.schema.is_some() || f.samples > 1 {
                fp.add(
                    format!("output of {}", f.name),
                    &(f.schema.as_deref(), f.samples, f.schema_retries),
                );
            }
            if let Some(model) = job.models.get(&f.role) {
                fp.add(format!("model of {}", f.name), &model_identity(model));
            }
        }
        for table in tables {
            if table == DOCUMENTS {
                fp.add("inputs", &job.inputs);
                fp.add("input policy", &format!("{:?}", job.read_rules.on_bad_line));
                fp.add("prepare settings", &job.prepare);
                fp.add(
                    "shard size",
                    &(job.execution.shard_rows, job.execution.input_shard_bytes),
                );
            } else if table == NEAR_DUPLICATES {
                fp.add("near-dedup settings", &job.prepare.near_dedup);
            } else if let Some(upstream) = out.get(table) {
                fp.add(format!("upstream {table}"), &upstream.digest());
            }
        }
        out.insert(name.clone(), fp);
    }
    out
}

/// The manifest: the job's name and every stage's fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Job name.
    pub job: String,
    /// Fingerprint of each stage.
    pub stages: BTreeMap<String, Fingerprint>,
    /// Stage names in the job's order (reports list stages this way).
    #[serde(default)]
    pub order: Vec<String>,
}

/// Reads the manifest under `root`, if there is one.
pub async fn read(root: &Location) -> Result<Option<Manifest>> {
    let path = root.path(MANIFEST);
    match root.store.get(&path).await {
        Ok(got) => {
            let bytes = got.bytes().await?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("{}: unreadable manifest", root.display(&path)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes the manifest under `root`.
pub async fn write(root: &Location, manifest: &Manifest) -> Result<()> {
    let body = serde_json::to_vec_pretty(manifest)
        .map_err(|e| Error::Internal(format!("manifest serialisation: {e}")))?;
    root.store
        .put(&root.path(MANIFEST), PutPayload::from(body))
        .await?;
    Ok(())
}

/// Stages whose recorded fingerprint differs from the current one, with what changed.
pub fn changed_stages(
    recorded: &Manifest,
    current: &BTreeMap<String, Fingerprint>,
) -> Vec<(String, Vec<String>)> {
    current
        .iter()
        .filter_map(|(name, fp)| {
            let old = recorded.stages.get(name)?;
            let changes = fp.changes(old);
            (!changes.is_empty()).then(|| (name.clone(), changes))
        })
        .collect()
}

/// Compares `job` with the manifest under `root`: a changed stage is refused, or with
/// `allow_changes` its outputs are removed. Then records the job's fingerprints and settings.
pub async fn reconcile(
    root: &Location,
    job: &Job,
    fingerprints: &BTreeMap<String, Fingerprint>,
    allow_changes: bool,
) -> Result<()> {
    if let Some(recorded) = read(root).await? {
        let mut changed = Vec::new();
        for (stage, changes) in changed_stages(&recorded, fingerprints) {
            if root
                .exists(&root.child(&stage).path(SUCCESS_MARKER))
                .await?
                || has_shard_markers(root, &stage).await?
            {
                changed.push((stage, changes));
            }
        }
        if !changed.is_empty() && !allow_changes {
            let list: Vec<String> = changed
                .iter()
                .map(|(stage, what)| format!("{stage} ({})", what.join(", ")))
                .collect();
            return job_error!(
                "{} was written by a different version of this job; changed since: {}. \
                 Pass --allow-changes to recompute those stages (recorded LLM responses to unchanged requests are reused), or choose another --output",
                root.describe(),
                list.join("; ")
            );
        }
        // Only the stage's publication is withdrawn: its shards carry their fingerprint and
        // are redone by whichever process claims them, each once. Deleting the folder would
        // also delete what another process, started with this one, has already recomputed.
        for (stage, _) in &changed {
            tracing::warn!(stage = %stage, "Job changed: recomputing the stage.");
            if let Some(stats) = read_stage_stats(root, stage).await?
                && stats.fingerprint != fingerprints[stage].digest()
            {
                delete_if_exists(root, &root.child(stage).path(SUCCESS_MARKER)).await?;
            }
        }
    }
    write(
        root,
        &Manifest {
            job: job.name.clone(),
            stages: fingerprints.clone(),
            order: job.stages.iter().map(|s| s.name.clone()).collect(),
        },
    )
    .await?;
    write_json(root, &root.path(JOB_FILE), &job.settings()).await
}

async fn has_shard_markers(root: &Location, stage: &str) -> Result<bool> {
    let dir = root.child(stage).child(SHARDS_DIR);
    Ok(dir
        .store
        .list(Some(&dir.prefix))
        .next()
        .await
        .transpose()?
        .is_some())
}
