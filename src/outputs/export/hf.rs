//! `--format hf`: a Hugging Face Hub folder, `data/<split>-NNNNN-of-MMMMM.parquet` and a card
//! whose YAML header `datasets` reads.

use super::*;

/// The `dataset_info.features` of a `--format hf` folder of pairs.
pub(super) const PAIR_FEATURES: &str = "  - name: id\n    dtype: string\n  - name: messages\n    list:\n\
    \x20   - name: role\n      dtype: string\n    - name: content\n      dtype: string\n\
    \x20 - name: origin\n    dtype: string\n  - name: tag\n    dtype: string\n\
    \x20 - name: score\n    dtype: float64\n  - name: doc_id\n    dtype: string\n";

/// Rows per Parquet file of a `--format hf` folder.
pub(super) const HF_ROWS_PER_FILE: usize = 100_000;

/// `--format hf`: the pairs as `data/<split>-NNNNN-of-NNNNN.parquet` under the output folder,
/// `test` holding `test_fraction` of them (chosen by a hash of the sampling seed and the id),
/// and README.md, the card, with the YAML header the Hub and `datasets` read.
pub(super) async fn write_hf<T: Clone>(
    opts: &ExportOptions,
    rows: &[T],
    id: impl Fn(&T) -> &str,
    encode: impl Fn(&[T]) -> Result<Vec<u8>>,
    features: &str,
    counts: &ExportCounts,
) -> Result<()> {
    let folder = Location::parse(&opts.output)?;
    let card_path = folder.path("README.md");
    if opts.card {
        check_card_at(&folder, &card_path).await?;
    }
    if !(0.0..1.0).contains(&opts.test_fraction) {
        return job_error!(
            "--test-fraction {}: give a share of the rows in [0, 1)",
            opts.test_fraction
        );
    }
    let split = |row: &T| is_held_out(opts.sample_seed, opts.test_fraction, id(row));
    let (files, splits) = hf_files(rows, split, encode)?;
    let earlier = owned_files(&folder).await?;
    let names: Vec<String> = files.iter().map(|(name, _)| name.clone()).collect();
    // What may be ours is recorded before it is written, so a crash leaves nothing of ours
    // that a later export would not know to remove.
    let mut both = earlier.clone();
    both.extend(names.iter().cloned());
    both.sort();
    both.dedup();
    write_owned(&folder, &both).await?;
    for (file, bytes) in files {
        folder
            .store
            .put(&folder.path(&file), PutPayload::from(bytes))
            .await?;
    }
    // Files of an earlier export that this one did not write again: left, `data/train-*`
    // would publish their rows beside the new ones.
    for stale in earlier.iter().filter(|f| !names.contains(f)) {
        crate::storage::delete_if_exists(&folder, &folder.path(stale)).await?;
    }
    write_owned(&folder, &names).await?;
    if opts.card {
        let card = format!(
            "{}{}",
            hf_front_matter(&opts.license, &splits, features),
            card_text(opts, counts, last_name(&folder)).await?
        );
        folder
            .store
            .put(&card_path, PutPayload::from(card.into_bytes()))
            .await?;
    }
    Ok(())
}

/// The record, in a `--format hf` folder, of the data files backforth wrote there.
const OWNED: &str = ".backforth-export.json";

/// The data files an earlier export wrote to `folder`. A folder whose `data/` holds files
/// without that record is someone else's, and is refused before anything is written.
async fn owned_files(folder: &Location) -> Result<Vec<String>> {
    use futures::TryStreamExt;
    let owned: Option<Vec<String>> = crate::storage::read_json(folder, &folder.path(OWNED)).await?;
    if let Some(owned) = owned {
        // Only names an export writes: a record planted in a folder must not make the
        // export delete anything else (a symlinked folder on the way included).
        if let Some(bad) = owned.iter().find(|f| !is_data_file(f)) {
            return job_error!(
                "{}: {OWNED} names '{bad}', which no export writes; the record is not backforth's. Remove it, or export into another folder",
                folder.describe()
            );
        }
        if let Ok(local) =
            object_store::local::LocalFileSystem::new().path_to_filesystem(&folder.path("data"))
            && folder.store_url.scheme() == "file"
            && std::fs::symlink_metadata(&local).is_ok_and(|m| m.file_type().is_symlink())
        {
            return job_error!(
                "{}: data/ is a symbolic link; an hf export replaces files there and does not follow it",
                folder.describe()
            );
        }
        return Ok(owned);
    }
    let data = folder.child("data");
    let found: Vec<object_store::ObjectMeta> =
        folder.store.list(Some(&data.prefix)).try_collect().await?;
    if let Some(first) = found.first() {
        return job_error!(
            "{}: its data/ folder holds files backforth did not write ({} among them); an hf export owns data/ and replaces what is there, so give an empty folder or one an export wrote",
            folder.describe(),
            folder.display(&first.location)
        );
    }
    Ok(Vec::new())
}

/// Whether `name` is a data file an export writes: `data/<split>-NNNNN-of-NNNNN.parquet`.
fn is_data_file(name: &str) -> bool {
    let Some(file) = name.strip_prefix("data/") else {
        return false;
    };
    let Some(stem) = file.strip_suffix(".parquet") else {
        return false;
    };
    let Some((split, numbers)) = stem.split_once('-') else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    matches!(split, "train" | "test")
        && numbers
            .split_once("-of-")
            .is_some_and(|(n, of)| digits(n) && digits(of))
}

/// Records `files` as the data files backforth wrote to `folder`.
async fn write_owned(folder: &Location, files: &[String]) -> Result<()> {
    crate::storage::write_json(folder, &folder.path(OWNED), &files).await
}

/// Whether the row `id` goes to the `test` split: a hash of the sampling seed and the id
/// below `fraction`, so the same seed splits alike.
pub(super) fn is_held_out(seed: u64, fraction: f64, id: &str) -> bool {
    let key = sample_key(seed, "split", id);
    let cut = (fraction * u64::MAX as f64) as u64;
    u64::from_str_radix(&key[..16], 16).unwrap_or(u64::MAX) < cut
}

/// The Parquet files of a Hub folder (`data/<split>-NNNNN-of-NNNNN.parquet`, by path) and its
/// splits: `rows` for which `held_out` holds go to `test`, the others to `train`.
pub fn hf_files<T: Clone>(
    rows: &[T],
    held_out: impl Fn(&T) -> bool,
    encode: impl Fn(&[T]) -> Result<Vec<u8>>,
) -> Result<(Vec<(String, Vec<u8>)>, Vec<Split<'static>>)> {
    let (test, train): (Vec<&T>, Vec<&T>) = rows.iter().partition(|row| held_out(row));
    let mut files = Vec::new();
    let mut splits = Vec::new();
    for (name, rows) in [("train", train), ("test", test)] {
        if rows.is_empty() && name == "test" {
            continue;
        }
        let mut chunks: Vec<Vec<T>> = rows
            .chunks(HF_ROWS_PER_FILE)
            .map(|c| c.iter().map(|row| (*row).clone()).collect())
            .collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let mut size = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            let bytes = encode(chunk)?;
            size += bytes.len();
            files.push((
                format!("data/{name}-{i:05}-of-{:05}.parquet", chunks.len()),
                bytes,
            ));
        }
        splits.push(Split {
            name,
            rows: rows.len(),
            bytes: size,
        });
    }
    Ok((files, splits))
}

/// A Hub folder of `pairs` (train only, provenance columns, no tag) with a card of `about`
/// under the YAML header: what `seed --format hf` writes for each direction.
pub fn hf_pairs_folder(
    pairs: &[Pair],
    license: &str,
    about: &str,
) -> Result<Vec<(String, Vec<u8>)>> {
    let encode = |chunk: &[Pair]| parquet_bytes(chunk, TagMode::None, true);
    let (mut files, splits) = hf_files(pairs, |_| false, encode)?;
    let card = format!(
        "{}{CARD_MARK}\n{about}\n",
        hf_front_matter(license, &splits, PAIR_FEATURES)
    );
    files.push(("README.md".to_string(), card.into_bytes()));
    Ok(files)
}

/// One split of a `--format hf` folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split<'a> {
    /// `train` or `test`.
    pub name: &'a str,
    /// Its rows.
    pub rows: usize,
    /// Its Parquet files' bytes.
    pub bytes: usize,
}

/// The YAML header of a Hub dataset card: license, task, size, the `default` config's files
/// per split, and the features with each split's size.
pub fn hf_front_matter(license: &str, splits: &[Split<'_>], features: &str) -> String {
    use std::fmt::Write as _;
    let total: usize = splits.iter().map(|s| s.rows).sum();
    let size = match total {
        0..1_000 => "n<1K",
        1_000..10_000 => "1K<n<10K",
        10_000..100_000 => "10K<n<100K",
        100_000..1_000_000 => "100K<n<1M",
        1_000_000..10_000_000 => "1M<n<10M",
        _ => "10M<n<100M",
    };
    let quoted = |s: &str| serde_json::to_string(s).expect("a string serialises");
    let mut yaml = format!(
        "---\nlicense: {}\ntask_categories:\n- text-generation\ntags:\n- synthetic\n\
         - instruction-backtranslation\nsize_categories:\n- {size}\nconfigs:\n\
         - config_name: default\n  data_files:\n",
        quoted(license)
    );
    for split in splits {
        let name = split.name;
        let _ = writeln!(yaml, "  - split: {name}\n    path: data/{name}-*");
    }
    yaml.push_str("dataset_info:\n  features:\n");
    yaml.push_str(features);
    yaml.push_str("  splits:\n");
    for split in splits {
        let _ = writeln!(
            yaml,
            "  - name: {}\n    num_bytes: {}\n    num_examples: {}",
            split.name, split.bytes, split.rows
        );
    }
    yaml.push_str("---\n");
    yaml
}
