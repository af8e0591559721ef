//! Exact dedup of the stage that reads the input, on its `dedup_key` column. Of the kept rows
//! sharing a key, the one first by (`file`, `line`, `ordinal`) survives, whatever order the
//! shards ran in:
//!
//! - within a shard, a later copy is dropped as `duplicate` while the shard runs;
//! - across shards, a copy is dropped as `duplicate_across_files` while its shard runs when a
//!   shard of the same run already kept a copy that comes first ([`KeptCopies`]); copies that
//!   escape this (the earlier one was written later, by a shard running alongside, or in
//!   another run) are moved out of their parts by the runner's pass once every shard is done.
//!
//! Dropping while running spares that pass most rewrites: on the web, short pages repeat in
//! nearly every file, and rewriting a part costs a decode and an encode of all its rows.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};

use crate::error::Result;
use crate::root::names::{
    ACROSS_FILES, DROP_REASON_COLUMN, DROPPED_DIR, moved_rows_file, part_file,
};
use crate::root::objects::{read_parquet_object, write_parquet_object};
use crate::storage::Location;

/// Kept texts a run remembers across its shards; past this many, new texts are no longer
/// remembered and their later copies are left to the pass after. 3 Mi entries of 40 bytes
/// stay within a table of 4 Mi slots: at most about 170 MB.
const REMEMBERED_TEXTS: usize = 3 << 20;

/// Where a row comes from, in the order that decides which copy survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    /// Rank of the row's `file` among the run's input files, sorted by path.
    file: u32,
    line: i64,
    ordinal: i64,
}

/// The earliest kept copy of a text seen so far in this run, and the shard that kept it.
#[derive(Clone, Copy)]
struct FirstCopy {
    at: Position,
    shard: u32,
}

#[derive(Default)]
struct Remembered {
    /// Key halves, not a `u128`, so an entry is 8- rather than 16-byte aligned.
    first: HashMap<[u64; 2], FirstCopy>,
    /// Shard -> the shards whose copies outranked rows it dropped.
    outranked_by: HashMap<u32, BTreeSet<u32>>,
}

/// The first kept copy of each text among the shards of one run, shared by shards running side
/// by side.
pub(crate) struct KeptCopies {
    /// Input file path -> its rank in path order.
    files: HashMap<String, u32>,
    remembered: Mutex<Remembered>,
}

impl KeptCopies {
    /// For a run over the input files shown as `files` (the values of the `file` column).
    pub(crate) fn new<'a>(files: impl IntoIterator<Item = &'a str>) -> Self {
        let sorted: BTreeSet<&str> = files.into_iter().collect();
        Self {
            files: sorted
                .into_iter()
                .enumerate()
                .map(|(rank, f)| (f.to_string(), rank as u32))
                .collect(),
            remembered: Mutex::default(),
        }
    }

    /// The shards whose kept copies made `shard` drop rows while it ran.
    pub(crate) fn outranking(&self, shard: u32) -> BTreeSet<u32> {
        let remembered = self.remembered.lock().expect("not poisoned");
        remembered
            .outranked_by
            .get(&shard)
            .cloned()
            .unwrap_or_default()
    }
}

/// Exact dedup for one shard, in read order.
pub(crate) struct FirstCopies {
    within: HashSet<u128>,
    kept: Arc<KeptCopies>,
    shard: u32,
}

impl FirstCopies {
    /// Dedup within shard number `shard` and against the copies `kept` holds.
    pub(crate) fn new(kept: Arc<KeptCopies>, shard: u32) -> Self {
        Self {
            within: HashSet::new(),
            kept,
            shard,
        }
    }

    /// The drop reasons `reasons` with repeats of `keys` among the kept rows marked, given the
    /// batch's (`file`, `line`, `ordinal`) columns when it has them.
    pub(crate) fn mark(
        &mut self,
        keys: &ArrayRef,
        reasons: ArrayRef,
        positions: Option<[&ArrayRef; 3]>,
    ) -> Result<ArrayRef> {
        let keys = cast(keys, &DataType::Utf8)?;
        let keys = keys.as_string::<i32>();
        let old = reasons.as_string::<i32>();
        let mut marked: Vec<Option<&str>> = Vec::with_capacity(keys.len());
        // Rows still kept after dedup within the shard, with their keys.
        let mut firsts = Vec::new();
        for row in 0..keys.len() {
            marked.push(match (old.is_null(row), keys.is_null(row)) {
                (false, _) => Some(old.value(row)),
                (true, true) => None,
                (true, false) => {
                    let key = key_bits(keys.value(row));
                    if self.within.insert(key) {
                        firsts.push((row, key));
                        None
                    } else {
                        Some("duplicate")
                    }
                }
            });
        }
        if let Some(positions) = positions
            && !firsts.is_empty()
        {
            let (kept, shard) = (&self.kept, self.shard);
            let at = Positions::of(kept, positions)?;
            let mut remembered = kept.remembered.lock().expect("not poisoned");
            for (row, key) in firsts {
                let Some(here) = at.get(row) else {
                    continue;
                };
                let len = remembered.first.len();
                match remembered.first.entry([key as u64, (key >> 64) as u64]) {
                    Entry::Occupied(first) if first.get().at < here => {
                        let by = first.get().shard;
                        remembered.outranked_by.entry(shard).or_default().insert(by);
                        marked[row] = Some(ACROSS_FILES);
                    }
                    // This copy comes first: a copy already written elsewhere is moved later.
                    Entry::Occupied(mut first) => {
                        first.insert(FirstCopy { at: here, shard });
                    }
                    Entry::Vacant(slot) => {
                        if len < REMEMBERED_TEXTS {
                            slot.insert(FirstCopy { at: here, shard });
                        }
                    }
                }
            }
        }
        Ok(Arc::new(StringArray::from(marked)))
    }
}

/// A batch's rows as [`Position`]s; `None` for a row with a NULL or a file not of the run.
struct Positions {
    files: Vec<Option<u32>>,
    lines: Int64Array,
    ordinals: Int64Array,
}

impl Positions {
    fn of(kept: &KeptCopies, [file, line, ordinal]: [&ArrayRef; 3]) -> Result<Self> {
        let file = cast(file, &DataType::Utf8)?;
        let mut last: Option<(&str, Option<u32>)> = None;
        let files = file
            .as_string::<i32>()
            .iter()
            .map(|f| {
                let f = f?;
                // A shard's rows nearly always share one file.
                match last {
                    Some((seen, rank)) if seen == f => rank,
                    _ => {
                        let rank = kept.files.get(f).copied();
                        last = Some((f, rank));
                        rank
                    }
                }
            })
            .collect();
        let int = |a: &ArrayRef| -> Result<Int64Array> {
            Ok(cast(a, &DataType::Int64)?.as_primitive().clone())
        };
        Ok(Self {
            files,
            lines: int(line)?,
            ordinals: int(ordinal)?,
        })
    }

    fn get(&self, row: usize) -> Option<Position> {
        let file = self.files[row]?;
        (self.lines.is_valid(row) && self.ordinals.is_valid(row)).then(|| Position {
            file,
            line: self.lines.value(row),
            ordinal: self.ordinals.value(row),
        })
    }
}

/// The 128 bits of a hex `dedup_key`; any other key is hashed to 128 bits.
fn key_bits(key: &str) -> u128 {
    let mut bytes = [0u8; 16];
    if hex::decode_to_slice(key, &mut bytes).is_err() {
        use sha2::{Digest, Sha256};
        bytes.copy_from_slice(&Sha256::digest(key.as_bytes())[..16]);
    }
    u128::from_le_bytes(bytes)
}

/// Moves the rows of `part-<part>.parquet` whose ids are in `repeated` (its file's outranked
/// copies) to its `-across` dropped part, adding to what an earlier pass moved; returns how
/// many rows that part holds. `None`: nothing of this part's file repeats, so only earlier
/// moves are counted.
pub(crate) async fn move_repeated_rows(
    root: &Location,
    out: &Location,
    part: &str,
    repeated: Option<&HashSet<String>>,
) -> Result<u64> {
    let kept_path = out.path(&part_file(part));
    let moved_path = out.child(DROPPED_DIR).path(&moved_rows_file(part));
    let mut moved = match root.exists(&moved_path).await? {
        true => read_parquet_object(root, &moved_path).await?,
        false => Vec::new(),
    };
    let Some(repeated) = repeated else {
        return Ok(moved.iter().map(|b| b.num_rows() as u64).sum());
    };
    let kept = read_parquet_object(root, &kept_path).await?;
    // Rows an interrupted pass already moved but did not yet remove from the part.
    let mut already = HashSet::new();
    for batch in &moved {
        let ids = string_column(batch, "id")?;
        already.extend(ids.iter().flatten().map(str::to_string));
    }
    let mut kept_now = Vec::new();
    let mut newly = 0;
    for batch in &kept {
        let ids = string_column(batch, "id")?;
        let hit: BooleanArray = ids
            .iter()
            .map(|id| Some(id.is_some_and(|id| repeated.contains(id))))
            .collect();
        if hit.true_count() == 0 {
            kept_now.push(batch.clone());
            continue;
        }
        newly += hit.true_count();
        let fresh: BooleanArray = ids
            .iter()
            .map(|id| Some(id.is_some_and(|id| repeated.contains(id) && !already.contains(id))))
            .collect();
        let n = fresh.true_count();
        let dropped = filter_record_batch(batch, &fresh)?;
        let reason = Arc::new(StringArray::from(vec![ACROSS_FILES; n]));
        let mut fields: Vec<Field> = dropped
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(DROP_REASON_COLUMN, DataType::Utf8, true));
        let mut columns = dropped.columns().to_vec();
        columns.push(reason);
        moved.push(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?);
        let keep = datafusion::arrow::compute::not(&hit)?;
        kept_now.push(filter_record_batch(batch, &keep)?);
    }
    if newly > 0 {
        // The dropped rows are written first: a crash before the part is rewritten finds
        // them again next time, and the dropped part is rewritten with the same rows.
        write_parquet_object(root, &moved_path, &moved).await?;
        write_parquet_object(root, &kept_path, &kept_now).await?;
    }
    Ok(moved.iter().map(|b| b.num_rows() as u64).sum())
}

/// A column of `batch` as strings (cast when stored as a view or dictionary).
fn string_column(batch: &RecordBatch, name: &str) -> Result<StringArray> {
    let column = cast(
        batch.column(batch.schema().index_of(name)?),
        &DataType::Utf8,
    )?;
    Ok(column.as_string::<i32>().clone())
}
