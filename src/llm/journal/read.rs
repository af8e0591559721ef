//! Reading the journal: a shard's segments and compacted object, side by side, lines torn
//! by a kill or a full disk skipped and counted.

use super::*;

/// Every entry of the segment objects `objects` (under `dir`), read side by side; a later
/// entry of a key replaces an earlier one. A line that cannot be read (torn by a kill or a
/// full disk) is skipped and counted: its response is requested again.
pub(super) async fn read_segments(
    dir: &Location,
    objects: Vec<ObjectMeta>,
    counters: &ReadCounters,
) -> Result<HashMap<String, Entry>> {
    Ok(read_objects(dir, objects, counters).await?.0)
}

/// Every response journaled for shard `shard` under `stage_dir`: its segments and its
/// compacted object. Listed again once if a segment went meanwhile (another process
/// compacted the shard), so none is taken for absent.
pub(super) async fn read_shard(
    stage_dir: &Location,
    shard: &str,
    counters: &ReadCounters,
) -> Result<HashMap<String, Entry>> {
    let compacted = stage_dir.path(&format!("{shard}.jsonl"));
    let mut again = true;
    loop {
        let mut objects = list(&stage_dir.child(shard)).await?;
        // A failure taken for absence would send every answered request again.
        objects.extend(stage_dir.head(&compacted).await?);
        let (entries, vanished) = read_objects(stage_dir, objects, counters).await?;
        if !vanished || !std::mem::take(&mut again) {
            return Ok(entries);
        }
    }
}

/// [`read_segments`], and whether an object listed was gone when read.
pub(super) async fn read_objects(
    dir: &Location,
    objects: Vec<ObjectMeta>,
    counters: &ReadCounters,
) -> Result<(HashMap<String, Entry>, bool)> {
    counters
        .objects
        .fetch_add(objects.len() as u64, Ordering::Relaxed);
    let store = Arc::clone(&dir.store);
    let bodies: Vec<Option<(Path, bytes::Bytes)>> = futures::stream::iter(objects)
        .map(|meta| {
            let store = Arc::clone(&store);
            async move {
                // Gone since it was listed: another process compacted the shard, and its
                // entries are in the compacted object.
                let got = match store.get(&meta.location).await {
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    got => got?,
                };
                Ok::<_, Error>(Some((meta.location, got.bytes().await?)))
            }
        })
        .buffered(PARALLEL_READS)
        .try_collect::<Vec<_>>()
        .await?;
    let vanished = bodies.iter().any(Option::is_none);
    let mut known = HashMap::new();
    for (path, bytes) in bodies.into_iter().flatten() {
        parse_lines(dir, &path, &bytes, counters, &mut known);
    }
    Ok((known, vanished))
}

/// Adds the entries of the journal object `path` (its bytes) to `known`, skipping and
/// counting lines that cannot be read.
pub(super) fn parse_lines(
    dir: &Location,
    path: &Path,
    bytes: &[u8],
    counters: &ReadCounters,
    known: &mut HashMap<String, Entry>,
) {
    // What follows the last newline is a line a kill tore while it was appended.
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |n| n + 1);
    if bytes[whole..].iter().any(|b| !b.is_ascii_whitespace()) {
        skipped(counters, dir, path, "its last line is incomplete");
    }
    for (i, line) in bytes[..whole].split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Entry>(line) {
            Ok(entry) => {
                known.insert(entry.key.clone(), entry);
            }
            Err(e) => skipped(counters, dir, path, &format!("line {}: {e}", i + 1)),
        }
    }
}

pub(super) fn skipped(counters: &ReadCounters, dir: &Location, path: &Path, what: &str) {
    counters.skipped_lines.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        segment = %dir.display(path),
        "Skipped an unreadable journal line ({what}): torn by a kill or a full disk; its response will be requested again."
    );
}
