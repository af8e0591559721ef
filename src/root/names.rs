//! The names of an output root: folders, markers, special columns and tables, part files.

use crate::storage::Location;

/// Name of the marker a complete stage output carries; it holds the stage's
/// [`StageStats`](crate::root::marker::StageStats).
pub const SUCCESS_MARKER: &str = "_SUCCESS";
/// Folder of a stage holding the rows it dropped, with the reason in [`DROP_REASON_COLUMN`].
pub const DROPPED_DIR: &str = "_dropped";
/// Folder of a sharded stage holding one marker per published shard.
pub const SHARDS_DIR: &str = "_shards";
/// Folder of the leases of the processes running on the root, one per worker slot.
pub const LEASES_DIR: &str = "_leases";
/// Folder of the claims on units of work, `<stage>/<unit>.json`, held while a process does one.
pub const CLAIMS_DIR: &str = "_claims";
/// The run's settings under the output root, for dataset cards: models, prompts' roles,
/// stages and thresholds (never endpoints or keys).
pub const JOB_FILE: &str = "_job.json";

/// Name of the table of seed pairs (`--seed DIR`).
pub const SEED: &str = "seed";

/// Column a stage's SQL uses to drop a row with a reason.
pub const DROP_COLUMN: &str = "_drop";
/// Column holding the drop reason in `<stage>/_dropped/`.
pub const DROP_REASON_COLUMN: &str = "drop_reason";
/// Column of the input stage holding the exact-dedup key (a hash of the normalised text).
pub const DEDUP_KEY_COLUMN: &str = "dedup_key";
/// Drop reason of rows whose text a file earlier by path already kept.
pub const ACROSS_FILES: &str = "duplicate_across_files";

/// The table of the rows `stage` dropped.
pub fn dropped_table(stage: &str) -> String {
    format!("{stage}_dropped")
}

/// Id of the `k`-th shard of the stage that reads the input.
pub fn input_shard_id(k: usize) -> String {
    format!("{k:05}")
}

/// How a stage names its Parquet parts: `part-<id>.parquet`.
#[derive(Debug, Clone)]
pub enum PartNames {
    /// Ids `00000`, `00001`, ... (or `<shard>-0000`, `<shard>-0001`, ... for the parts of an
    /// input shard) of at most `rows` rows each: the shards later stages work on.
    Numbered {
        /// The input shard the parts come from.
        shard: Option<String>,
        /// Rows per part.
        rows: usize,
    },
    /// One part whose id is the shard's: the output of one shard.
    Shard(String),
}

impl PartNames {
    /// The id of the `n`-th part.
    pub fn id(&self, n: usize) -> String {
        match self {
            PartNames::Numbered { shard: None, .. } => format!("{n:05}"),
            PartNames::Numbered {
                shard: Some(shard), ..
            } => format!("{shard}-{n:04}"),
            PartNames::Shard(id) => id.clone(),
        }
    }

    /// Rows a part holds at most.
    pub fn rows_per_part(&self) -> usize {
        match self {
            PartNames::Numbered { rows, .. } => *rows,
            PartNames::Shard(_) => usize::MAX,
        }
    }
}

/// The file of part `id`.
pub fn part_file(id: &str) -> String {
    format!("part-{id}.parquet")
}

/// The file under `_dropped/` of the rows moved out of part `id` as copies across files.
pub fn moved_rows_file(id: &str) -> String {
    format!("part-{id}-across.parquet")
}

/// True when `file` is one of the parts of input shard `shard` (see [`PartNames::Numbered`]).
pub fn is_part_of_input_shard(file: &str, shard: &str) -> bool {
    file.strip_prefix("part-")
        .and_then(|rest| rest.strip_prefix(shard))
        .is_some_and(|rest| rest.starts_with('-'))
}

/// The input shard a part of the input stage came from (`00003` for `00003-0001`).
pub fn input_shard_of_part(id: &str) -> Option<&str> {
    id.split_once('-').map(|(shard, _)| shard)
}

/// Where the marker publishing shard `id` of the stage under `stage_dir` is written.
pub fn shard_marker_path(stage_dir: &Location, id: &str) -> object_store::path::Path {
    stage_dir.child(SHARDS_DIR).path(&format!("{id}.json"))
}

/// The id of the part stored in the file `file` (`part-<id>.parquet`, or under `_dropped/`
/// also `part-<id>-across.parquet`); `None` for any other file.
pub fn part_id_of_file(file: &str) -> Option<&str> {
    let id = file.strip_prefix("part-")?.strip_suffix(".parquet")?;
    Some(id.strip_suffix("-across").unwrap_or(id))
}
