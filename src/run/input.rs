//! The stage that reads the input: one shard per input file (or row-group range of a large
//! Parquet file), run side by side, each published by its marker; then exact duplicates
//! across files are dropped in one pass.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, RecordBatch, UInt64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, UInt64Type};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};

use crate::engine::documents::documents_table;
use crate::error::{Error, Result};
use crate::job::catalog::DOCUMENTS;
use crate::llm::journal::JournalScope;
use crate::prepare::ingest::{DECODERS_AT_ONCE, IngestCounts, IngestStats, split_large_parquet};
use crate::root::marker::{
    StageStats, read_shard_stats, read_stage_stats, write_shard_stats, write_stage_stats,
};
use crate::root::names::{
    ACROSS_FILES, DEDUP_KEY_COLUMN, DROPPED_DIR, PartNames, input_shard_id, input_shard_of_part,
};
use crate::root::objects::{delete_parts_of, remove_shards_except};
use crate::root::tables::register_stage_table;
use crate::run::exact_dedup::{FirstCopies, KeptCopies, move_repeated_rows};
use crate::run::plan::StagePlan;
use crate::run::runner::{AbortOnDrop, Runner};
use crate::run::units::{Unit, Waiting, preference};
use crate::storage::{InputFile, keys_under_common_root, list_inputs};

/// The unit name of the pass across files.
const ACROSS_FILES_UNIT: &str = "across-files";

impl Runner<'_> {
    /// Runs the stage that reads `documents`: each input file (or row-group range of a large
    /// Parquet file) is a shard, a unit of work published by its marker and skipped on rerun,
    /// run side by side. Once every shard is published, whichever process claims it drops
    /// exact duplicates across files in one pass and publishes the stage.
    pub(super) async fn run_input_stage(&self, plan: &StagePlan) -> Result<StageStats> {
        let files = self.input_files().await?;
        let sources: BTreeMap<String, String> = files
            .iter()
            .enumerate()
            .map(|(k, file)| {
                (
                    input_shard_id(k),
                    format!(
                        "{} ({} bytes, {})",
                        file.describe(),
                        file.size,
                        file.version
                    ),
                )
            })
            .collect();
        let shown: Vec<String> = files.iter().map(|f| f.display.clone()).collect();
        let digest = sources_digest(&sources);
        let mut waiting = Waiting::new(self.job.execution.wait_secs);
        loop {
            let markers = self.input_shards(plan, &files, &sources).await?;
            if let Some(done) = self.input_stage_done(plan, &digest, &markers).await? {
                return Ok(done);
            }
            let pass = async {
                // Another process may have finished the pass between the look and the claim:
                // its rewrites changed the markers.
                let markers = self.input_shards(plan, &files, &sources).await?;
                if let Some(done) = self.input_stage_done(plan, &digest, &markers).await? {
                    return Ok(done);
                }
                self.across_files(plan, &sources, &shown, markers, &digest)
                    .await
            };
            let holder = match self.claimed(&plan.name, ACROSS_FILES_UNIT, pass).await? {
                Unit::Done(stats) => return Ok(stats),
                Unit::HeldBy(holder) => holder,
            };
            // Polls the pass's claim and the stage's marker, not every shard's.
            let unit = format!("{} (the pass across files)", plan.name);
            let mut holder = Some(holder);
            while let Some(h) = holder {
                waiting.wait(&plan.name, &[(unit.clone(), h)]).await?;
                if read_stage_stats(&self.root, &plan.name)
                    .await?
                    .is_some_and(|s| self.stands(plan, &s, &digest))
                {
                    break;
                }
                holder = self.holder_of(&plan.name, ACROSS_FILES_UNIT).await?;
            }
        }
    }

    /// The input stage's `_SUCCESS`, when it was published from these very shards (no marker
    /// rewritten since, none redone): the passes over the whole table would find what they
    /// found then, at the cost of reading every row again.
    async fn input_stage_done(
        &self,
        plan: &StagePlan,
        digest: &str,
        markers: &BTreeMap<String, StageStats>,
    ) -> Result<Option<StageStats>> {
        let found = markers_digest(markers);
        Ok(read_stage_stats(&self.root, &plan.name).await?.filter(|s| {
            self.stands(plan, s, digest) && s.shards_digest.as_deref() == Some(found.as_str())
        }))
    }

    /// The pass across files, under its claim: removes the shards of inputs that are gone,
    /// drops exact duplicates across files and publishes the stage.
    async fn across_files(
        &self,
        plan: &StagePlan,
        sources: &BTreeMap<String, String>,
        shown: &[String],
        mut markers: BTreeMap<String, StageStats>,
        digest: &str,
    ) -> Result<StageStats> {
        // The pass rewrites parts in place: no reader may take the stage as complete meanwhile.
        self.withdraw_stage(plan).await?;
        // Before anything reads the stage as a table: rows of inputs that are gone (or of
        // shards numbered otherwise before) would count as copies or keep stale ids.
        let current: BTreeSet<String> = sources.keys().cloned().collect();
        let stale = remove_shards_except(&self.root.child(&plan.name), &current, |part| {
            input_shard_of_part(part).unwrap_or(part)
        })
        .await?;
        if stale > 0 {
            tracing::info!(stage = %plan.name, objects = stale, "Removed the shards of inputs that are gone.");
        }
        // In input order (ids sort as numbers only up to 99,999 shards).
        let mut shards: Vec<(String, String, StageStats)> = shown
            .iter()
            .enumerate()
            .map(|(k, file)| {
                let id = input_shard_id(k);
                let marker = markers.remove(&id).expect("every shard done");
                (id, file.clone(), marker)
            })
            .collect();
        // One session reads the stage as a table for both passes over every shard.
        let ctx = self.session()?;
        register_stage_table(&ctx, &self.root, &plan.name).await?;
        self.drop_duplicates_across_files(&ctx, plan, &mut shards)
            .await?;
        require_unique_ids(&ctx, plan).await?;
        let mut total = StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            input: Some(IngestCounts::default()),
            upstream: digest.to_string(),
            ..StageStats::default()
        };
        let mut parts = Vec::new();
        for (_, _, marker) in &shards {
            parts.extend(marker.shards.iter().cloned());
            total.absorb(marker);
        }
        total.shards = parts;
        total.shards_digest = Some(markers_digest(shards.iter().map(|(id, _, m)| (id, m))));
        write_stage_stats(&self.root, &plan.name, &total).await?;
        Ok(total)
    }

    /// Every file the job's inputs match, large Parquet files cut into row-group ranges.
    async fn input_files(&self) -> Result<Vec<InputFile>> {
        let mut files = Vec::new();
        for input in &self.job.inputs {
            files.extend(list_inputs(input).await?);
        }
        if self.job.inputs.len() > 1 {
            keys_under_common_root(&mut files);
        }
        let shard_bytes = self
            .job
            .execution
            .input_shard_bytes
            .unwrap_or(256 << 20)
            .max(1);
        split_large_parquet(files, shard_bytes).await
    }

    /// Every input shard, found published or run now (claimed, side by side, this worker's
    /// first); shards live processes hold are waited for. Returns the markers by shard id.
    async fn input_shards(
        &self,
        plan: &StagePlan,
        files: &[InputFile],
        sources: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, StageStats>> {
        let kept = Arc::new(KeptCopies::new(files.iter().map(|f| f.display.as_str())));
        self.progress
            .shards_total
            .store(files.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let parallel = self
            .job
            .execution
            .target_partitions
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .clamp(1, DECODERS_AT_ONCE);
        let mut pending = preference(self.worker, files.len());
        let mut markers = BTreeMap::new();
        let mut waiting = Waiting::new(self.job.execution.wait_secs);
        loop {
            let results: Vec<(usize, Result<Unit<StageStats>>)> = futures::stream::iter(pending)
                .map(|k| {
                    let kept = &kept;
                    async move {
                        let unit = self.input_shard(plan, k, &files[k], sources, kept).await;
                        (k, unit)
                    }
                })
                .buffered(parallel)
                .collect()
                .await;
            let mut held = Vec::new();
            pending = Vec::new();
            let mut first_error = None;
            for (k, unit) in results {
                match unit {
                    Ok(Unit::Done(marker)) => {
                        self.progress
                            .shards_done
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        markers.insert(input_shard_id(k), marker);
                    }
                    Ok(Unit::HeldBy(holder)) => {
                        held.push((input_shard_id(k), holder));
                        pending.push(k);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            if pending.is_empty() {
                return Ok(markers);
            }
            waiting.wait(&plan.name, &held).await?;
        }
    }

    /// Shard `k` of the input stage: its marker when it was published under this definition
    /// and every input its dedup relied on is unchanged, else the shard run and published
    /// now under its claim (or who holds it). `sources` holds each shard's input by id.
    pub(super) async fn input_shard(
        &self,
        plan: &StagePlan,
        k: usize,
        file: &InputFile,
        sources: &BTreeMap<String, String>,
        kept: &Arc<KeptCopies>,
    ) -> Result<Unit<StageStats>> {
        let id = input_shard_id(k);
        let source = &sources[&id];
        let current =
            || async {
                Ok::<_, Error>(read_shard_stats(&self.root, &plan.name, &id).await?.filter(
                    |done| self.stands(plan, done, source) && input_shard_current(done, sources),
                ))
            };
        if let Some(done) = current().await? {
            return Ok(Unit::Done(done));
        }
        let run = async {
            if let Some(done) = current().await? {
                return Ok(done);
            }
            self.withdraw_shard(plan, &id).await?;
            let dedup = FirstCopies::new(Arc::clone(kept), k as u32);
            let journal_name = file.journal_name();
            let journal = self.journal_of(&plan.name, &journal_name).await?;
            let stats = self
                .run_input_shard(plan, &id, file.clone(), dedup, &journal)
                .await?;
            let outranked_by = kept
                .outranking(k as u32)
                .into_iter()
                .map(|j| {
                    let id = input_shard_id(j as usize);
                    let input = sources[&id].clone();
                    (id, input)
                })
                .collect();
            let marker = StageStats {
                journal: Some(journal_name),
                dropped_while_running: Some(stats.dropped.get(ACROSS_FILES).copied().unwrap_or(0)),
                outranked_by,
                upstream: source.clone(),
                ..stats
            };
            write_shard_stats(&self.root, &plan.name, &id, &marker).await?;
            self.compact(&journal).await;
            Ok(marker)
        };
        self.claimed(&plan.name, &id, run).await
    }

    pub(super) async fn run_input_shard(
        &self,
        plan: &StagePlan,
        id: &str,
        file: InputFile,
        dedup: FirstCopies,
        journal: &Arc<JournalScope>,
    ) -> Result<StageStats> {
        let out = self.root.child(&plan.name);
        // Parts of an attempt that died before its marker are replaced, never mixed in.
        delete_parts_of(&out, id).await?;
        delete_parts_of(&out.child(DROPPED_DIR), id).await?;
        // One partition: rows reach the writer in the file's order, which is what makes the
        // first copy of a text the same one on every run. Shards run side by side instead.
        let ctx = self.session_with(Some(1), journal)?;
        let ingest = Arc::new(IngestStats::default());
        ctx.register_table(
            DOCUMENTS,
            Arc::new(documents_table(
                vec![file],
                self.job.read_rules,
                Arc::clone(&ingest),
            )?),
        )?;
        let mut stats = self
            .execute_with(
                &ctx,
                plan,
                &out,
                PartNames::Numbered {
                    shard: Some(id.to_string()),
                    rows: self.shard_rows(),
                },
                Some(dedup),
            )
            .await?;
        stats.input = Some(ingest.snapshot());
        Ok(stats)
    }

    /// Drops kept rows whose `dedup_key` a file earlier by path (or an earlier row of the same
    /// file, when a large file ran as several shards) also kept, which their shards could not
    /// drop while running: the copy with the smallest (file, line, ordinal) survives, whatever
    /// order the shards ran in. Affected parts are rewritten, the rows moved to
    /// `_dropped/<part>-across.parquet` under `duplicate_across_files`, and each shard's
    /// marker counts them with those it dropped itself. Safe to repeat after a crash at any
    /// point.
    pub(super) async fn drop_duplicates_across_files(
        &self,
        ctx: &SessionContext,
        plan: &StagePlan,
        shards: &mut [(String, String, StageStats)],
    ) -> Result<()> {
        let out = self.root.child(&plan.name);
        let schema = ctx.table(plan.name.as_str()).await?.schema().clone();
        let needed = [DEDUP_KEY_COLUMN, "file", "line", "ordinal", "id"];
        if shards.len() < 2
            || needed
                .iter()
                .any(|c| !schema.has_column_with_unqualified_name(c))
        {
            return Ok(());
        }
        let repeated = Arc::new(outranked_rows(ctx, &plan.name).await?);
        // Each part on a task of its own, several at once: copies the shards could not drop
        // while they ran (those of shards run side by side, or in another run) can be spread
        // over many parts.
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (out_dir, repeated) = (&out, &repeated);
        let moves = shards
            .iter()
            .enumerate()
            .flat_map(|(k, (_, file, marker))| {
                marker.shards.iter().map(move |part| {
                    let (root, out, part) = (self.root.clone(), out_dir.clone(), part.clone());
                    let (repeated, file) = (Arc::clone(repeated), file.clone());
                    // Aborted if the pass is dropped (its claim was taken over).
                    AbortOnDrop(tokio::spawn(async move {
                        let ids = repeated.get(&file);
                        let moved = move_repeated_rows(&root, &out, &part, ids).await;
                        moved.map(|n| (k, n))
                    }))
                })
            });
        // Unordered: a part being rewritten must not hold up the parts queued after it.
        let counts: Vec<(usize, u64)> = futures::stream::iter(moves)
            .buffer_unordered(parallel)
            .map(|joined| {
                joined.map_err(|e| Error::Internal(format!("moving repeated rows: {e}")))?
            })
            .try_collect()
            .await?;
        let mut moved_from = vec![0; shards.len()];
        for (k, n) in counts {
            moved_from[k] += n;
        }
        for ((shard, _, marker), moved) in shards.iter_mut().zip(moved_from) {
            let across = marker.dropped_while_running.unwrap_or(0) + moved;
            let stats = &mut *marker;
            let before = stats.dropped.get(ACROSS_FILES).copied().unwrap_or(0);
            if across != before {
                if across == 0 {
                    stats.dropped.remove(ACROSS_FILES);
                } else {
                    stats.dropped.insert(ACROSS_FILES.to_string(), across);
                }
                stats.rows_out = stats.rows_in - stats.dropped.values().sum::<u64>();
                write_shard_stats(&self.root, &plan.name, shard, stats).await?;
            }
        }
        Ok(())
    }
}

/// The in-memory table of hashes of ids given at more than one place.
const SUSPECT_IDS: &str = "_suspect_ids";
/// The in-memory table of hashes of exact-dedup keys kept more than once.
const REPEATED_KEYS: &str = "_repeated_keys";
/// Most suspect id hashes looked at: the error names the first clash only.
const MOST_SUSPECTS: usize = 1024;

/// The `UInt64` values of the first column of `sql`'s rows.
async fn hashes(ctx: &SessionContext, sql: &str) -> Result<Vec<u64>> {
    let batches = ctx.sql(sql).await?.collect().await?;
    let mut values = Vec::new();
    for batch in &batches {
        let column = batch
            .column(0)
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "expected hashes, got {}",
                    batch.column(0).data_type()
                ))
            })?;
        values.extend(column.iter().flatten());
    }
    Ok(values)
}

/// Registers `hashes` as the one-column (`h`) in-memory table `name`: a join on it builds its
/// hash table from these few rows, whose count the planner knows, rather than from the stage.
fn register_hashes(ctx: &SessionContext, name: &str, hashes: Vec<u64>) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![Field::new("h", DataType::UInt64, false)]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(UInt64Array::from(hashes))],
    )?;
    ctx.register_table(
        name,
        Arc::new(MemTable::try_new(schema, vec![vec![batch]])?),
    )?;
    Ok(())
}

/// Fails, naming both places, when two kept documents of the input stage share an id:
/// near-dedup and the pass above tell rows apart by id. (Copies of one document with one
/// id were already dropped as duplicates.)
async fn require_unique_ids(ctx: &SessionContext, plan: &StagePlan) -> Result<()> {
    let schema = ctx.table(plan.name.as_str()).await?.schema().clone();
    if ["doc_id", "file", "line"]
        .iter()
        .any(|c| !schema.has_column_with_unqualified_name(c))
    {
        return Ok(());
    }
    // Grouping every row by its id string (with the least and greatest file name of each)
    // held several times the ids' size; eight-byte hashes find the few ids that may repeat
    // (usually none), and only their rows are compared as strings.
    let suspects = hashes(
        ctx,
        &format!(
            "SELECT id FROM (SELECT hash64(doc_id) AS id, \
                 hash64(concat(file, ':', CAST(line AS VARCHAR))) AS place FROM {t}) \
             GROUP BY id HAVING min(place) <> max(place) LIMIT {MOST_SUSPECTS}",
            t = plan.name
        ),
    )
    .await?;
    if suspects.is_empty() {
        return Ok(());
    }
    register_hashes(ctx, SUSPECT_IDS, suspects)?;
    let batches = ctx
        .sql(&format!(
            "WITH suspect_rows AS (SELECT doc_id, file, line FROM {t} \
                     WHERE hash64(doc_id) IN (SELECT h FROM {SUSPECT_IDS})) \
                 SELECT doc_id, file, line FROM suspect_rows WHERE doc_id IN \
                 (SELECT doc_id FROM suspect_rows GROUP BY doc_id \
                  HAVING min(file) <> max(file) OR min(line) <> max(line)) \
                 ORDER BY doc_id, file, line LIMIT 2",
            t = plan.name
        ))
        .await?
        .collect()
        .await?;
    ctx.deregister_table(SUSPECT_IDS)?;
    let mut places = Vec::new();
    for batch in &batches {
        let columns: Vec<_> = (0..3)
            .map(|c| cast(batch.column(c), &DataType::Utf8))
            .collect::<std::result::Result<_, _>>()?;
        for r in 0..batch.num_rows() {
            let value = |c: usize| columns[c].as_string::<i32>().value(r).to_string();
            places.push((value(0), value(1), value(2)));
        }
    }
    let [(id, first_file, first_line), (_, file, line), ..] = places.as_slice() else {
        return Ok(());
    };
    Err(Error::Input {
        file: file.clone(),
        line: line.parse().unwrap_or(0),
        message: format!(
            "document id '{id}' was already given to the document at {first_file}:{first_line}; \
                 ids must be unique across the input: fix them, or leave out the `id` field to \
                 derive each from its file and line"
        ),
    })
}

/// File -> ids of its kept rows whose text a copy earlier by (file, line, ordinal) also kept,
/// in the registered table `stage`.
async fn outranked_rows(
    ctx: &SessionContext,
    stage: &str,
) -> Result<HashMap<String, HashSet<String>>> {
    // Repeats are rare: a hash aggregate over eight-byte hashes of the keys finds them, and
    // only those rows are ranked (sorting every row's key cost more than the rest of the pass;
    // grouping by the key strings held their size again). The hashes go in a table of their
    // own, which the join builds its table from: given the query's subquery, the planner
    // built it from every row of the stage.
    let repeated = hashes(
        ctx,
        &format!(
            "SELECT hash64(dedup_key) FROM {stage} WHERE dedup_key IS NOT NULL \
             GROUP BY 1 HAVING count(*) > 1"
        ),
    )
    .await?;
    if repeated.is_empty() {
        return Ok(HashMap::new());
    }
    register_hashes(ctx, REPEATED_KEYS, repeated)?;
    let batches = ctx
        .sql(&format!(
            "SELECT file, id FROM (SELECT file, id, row_number() OVER (PARTITION BY dedup_key \
                 ORDER BY file, line, ordinal) AS copy FROM {stage} \
                 WHERE dedup_key IS NOT NULL AND hash64(dedup_key) IN (SELECT h FROM {REPEATED_KEYS})) \
             WHERE copy > 1"
        ))
        .await?
        .collect()
        .await?;
    ctx.deregister_table(REPEATED_KEYS)?;
    // file -> ids of its rows that a copy elsewhere outranks.
    let mut repeated: HashMap<String, HashSet<String>> = HashMap::new();
    for batch in &batches {
        let (files, ids) = (
            cast(batch.column(0), &DataType::Utf8)?,
            cast(batch.column(1), &DataType::Utf8)?,
        );
        let (files, ids) = (files.as_string::<i32>(), ids.as_string::<i32>());
        for r in 0..batch.num_rows() {
            repeated
                .entry(files.value(r).to_string())
                .or_default()
                .insert(ids.value(r).to_string());
        }
    }
    Ok(repeated)
}

/// True when every input an input shard's dedup relied on (`outranked_by`) is unchanged.
fn input_shard_current(done: &StageStats, sources: &BTreeMap<String, String>) -> bool {
    done.outranked_by
        .iter()
        .all(|(id, input)| sources.get(id) == Some(input))
}

/// A short hash of every input shard's source: what the published input stage was computed
/// from, so a worker waiting for it can tell a stale one.
fn sources_digest(sources: &BTreeMap<String, String>) -> String {
    short_hash(sources)
}

/// A short hash of input shard markers by shard id, timings included: a shard redone since
/// gives another, even with the same counts. When a marker was written is left out: the pass
/// across files rewrites markers it holds, and the hash is of what they say.
fn markers_digest<'a>(markers: impl IntoIterator<Item = (&'a String, &'a StageStats)>) -> String {
    let said: BTreeMap<&String, StageStats> = markers
        .into_iter()
        .map(|(id, m)| {
            let said = StageStats {
                written_at_ms: None,
                ..m.clone()
            };
            (id, said)
        })
        .collect();
    short_hash(&said)
}

/// The first twelve bytes, in hex, of the SHA-256 of `value` as JSON.
fn short_hash(value: &impl serde::Serialize) -> String {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_vec(value).expect("maps serialise");
    hex::encode(&Sha256::digest(&json)[..12])
}
