//! Benchmark decontamination: the word n-grams of every benchmark item the job names, in one
//! index built once per run, and the check of a row's texts against it.
//!
//! Text is normalised before it is cut into n-grams: lower case, and anything that is not a
//! letter or digit (punctuation, whitespace, line breaks) a word break, so a copy that was
//! re-wrapped, re-cased or re-punctuated has the same n-grams. The index is the n-grams'
//! 64-bit hashes, sorted, with the item of each (12 bytes per n-gram) and a directory of
//! buckets by the hash's top bits, so a lookup is a short binary search; a bit table of the
//! hashes' low bits (2 bytes per n-gram) first answers most n-grams that are in no item. An n-gram found in
//! more than `max_items` items is boilerplate of the benchmark ("Which of the following ...")
//! and left out: it would tie every item to every row.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use object_store::ObjectStoreExt;
use serde_json::Value;

use crate::error::{Context, Error, Result};
use crate::storage::{InputFile, InputFormat, list_inputs};

/// How a row's overlap with an item decides that it is contaminated.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// At least `threshold` n-grams shared with the item.
    Any,
    /// At least a `threshold` share of the item's n-grams found in the row.
    Share,
}

/// One benchmark: its files and the fields of each item that are matched.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Benchmark {
    /// Name reported with every match.
    pub name: String,
    /// Files, folders (a Hugging Face dataset folder: every JSONL and Parquet file in it),
    /// globs or URLs.
    pub paths: Vec<String>,
    /// Fields of each item whose text is matched (lists are read element by element).
    pub fields: Vec<String>,
    /// Field holding the item's id; `None`: the file's name and the item's row number.
    pub id: Option<String>,
}

/// The `[decontaminate]` settings, resolved.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decontamination {
    /// Words per n-gram (13 by default, as marin; 8 at least, as open-r1).
    pub n: usize,
    /// How overlap decides.
    pub measure: Measure,
    /// Shared n-grams (`any`) or share of the item's n-grams (`share`) that make a match.
    pub threshold: f64,
    /// N-grams in more items than this are the benchmark's boilerplate, not evidence.
    pub max_items: usize,
    /// The benchmarks.
    pub benchmarks: Vec<Benchmark>,
    /// What the benchmark files were when the run listed them (names, sizes, versions): part
    /// of the fingerprint of every stage that checks rows against them.
    pub files: String,
}

/// The hash of each word n-gram of `text`, normalised (see the module docs), in order.
pub fn gram_hashes(text: &str, n: usize) -> Vec<u64> {
    const BASE: u64 = 0x9E37_79B9_7F4A_7C15;
    let words = word_hashes(text);
    if n == 0 || words.len() < n {
        return Vec::new();
    }
    // A rolling polynomial over the words' hashes: each n-gram in O(1).
    let top = (1..n).fold(1u64, |p, _| p.wrapping_mul(BASE));
    let mut h = words[..n]
        .iter()
        .fold(0u64, |h, &w| h.wrapping_mul(BASE).wrapping_add(w));
    let mut out = Vec::with_capacity(words.len() - n + 1);
    out.push(mix(h));
    for i in n..words.len() {
        h = h
            .wrapping_sub(words[i - n].wrapping_mul(top))
            .wrapping_mul(BASE)
            .wrapping_add(words[i]);
        out.push(mix(h));
    }
    out
}

/// FNV-1a of each lower-cased run of letters and digits.
fn word_hashes(text: &str) -> Vec<u64> {
    const START: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = Vec::with_capacity(text.len() / 5);
    let mut h = START;
    let mut in_word = false;
    for c in text.chars() {
        // Most web text is ASCII: its letters lower-case in one instruction.
        if c.is_ascii() {
            let b = c as u8;
            if b.is_ascii_alphanumeric() {
                h = (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x0100_0000_01b3);
                in_word = true;
            } else if in_word {
                words.push(h);
                h = START;
                in_word = false;
            }
            continue;
        }
        if c.is_alphanumeric() {
            for lower in c.to_lowercase() {
                let mut buf = [0u8; 4];
                for b in lower.encode_utf8(&mut buf).bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                }
            }
            in_word = true;
        } else if in_word {
            words.push(h);
            h = START;
            in_word = false;
        }
    }
    if in_word {
        words.push(h);
    }
    words
}

/// splitmix64's finaliser: spreads the polynomial's bits so buckets by top bits are even.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One field of one benchmark item, as indexed.
#[derive(Debug, Clone)]
struct Entry {
    benchmark: u16,
    field: u16,
    id: String,
    grams: u32,
}

/// A row's strongest match.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// The benchmark's name.
    pub benchmark: String,
    /// The item's id.
    pub item: String,
    /// The item's field that matched.
    pub field: String,
    /// The row's column that matched.
    pub column: String,
    /// N-grams the row and the item's field share.
    pub shared: u64,
    /// The share of the item field's n-grams found in the row.
    pub overlap: f64,
}

/// Counts of what was indexed, for the run's log and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct IndexStats {
    /// Benchmark files read.
    pub files: usize,
    /// Items read.
    pub items: usize,
    /// Distinct n-grams kept.
    pub grams: usize,
    /// Distinct n-grams left out as boilerplate.
    pub boilerplate: usize,
}

/// Every benchmark n-gram and the item field it comes from; see the module docs.
#[derive(Debug)]
pub struct BenchmarkIndex {
    settings: Decontamination,
    /// One bit per slot of a hash's low bits, set for every key: most of a row's n-grams are
    /// in no benchmark, and this answers them from a table a sixteenth of the keys' size.
    filter: Vec<u64>,
    filter_mask: u64,
    keys: Vec<u64>,
    items: Vec<u32>,
    buckets: Vec<u32>,
    shift: u32,
    entries: Vec<Entry>,
    /// What was indexed.
    pub stats: IndexStats,
}

/// Builds an index from item fields, then sorts it once.
struct Builder {
    n: usize,
    pairs: Vec<(u64, u32)>,
    entries: Vec<Entry>,
    items: usize,
    files: usize,
}

impl Builder {
    fn new(n: usize) -> Self {
        Self {
            n,
            pairs: Vec::new(),
            entries: Vec::new(),
            items: 0,
            files: 0,
        }
    }

    /// Item `id` of benchmark `b`, the text of each of its fields in the benchmark's order.
    fn item(&mut self, b: usize, id: &str, fields: &[impl AsRef<str>]) {
        self.items += 1;
        for (f, text) in fields.iter().enumerate() {
            self.add(b as u16, f as u16, id, text.as_ref());
        }
    }

    fn add(&mut self, benchmark: u16, field: u16, id: &str, text: &str) {
        let mut grams = gram_hashes(text, self.n);
        grams.sort_unstable();
        grams.dedup();
        if grams.is_empty() {
            return;
        }
        let entry = self.entries.len() as u32;
        self.entries.push(Entry {
            benchmark,
            field,
            id: id.to_string(),
            grams: grams.len() as u32,
        });
        self.pairs.extend(grams.into_iter().map(|g| (g, entry)));
    }

    fn finish(mut self, settings: Decontamination) -> BenchmarkIndex {
        self.pairs.sort_unstable();
        let mut keys = Vec::new();
        let mut items = Vec::new();
        let mut boilerplate = 0;
        for run in self.pairs.chunk_by(|a, b| a.0 == b.0) {
            let mut distinct: Vec<u32> = run.iter().map(|p| p.1).collect();
            distinct.dedup();
            if distinct.len() > settings.max_items {
                boilerplate += 1;
                continue;
            }
            keys.push(run[0].0);
            items.push(run[0].1);
        }
        drop(self.pairs);
        // About four n-grams per bucket.
        let bits = (usize::BITS - (keys.len() / 4).max(1).leading_zeros()).clamp(1, 30);
        let shift = 64 - bits;
        let mut buckets = vec![0u32; (1usize << bits) + 1];
        for key in &keys {
            buckets[(key >> shift) as usize + 1] += 1;
        }
        for i in 1..buckets.len() {
            buckets[i] += buckets[i - 1];
        }
        // About sixteen bits per key: a few percent of absent n-grams pass to the keys.
        let filter_bits = (keys.len() * 16).next_power_of_two().clamp(64, 1 << 32);
        let filter_mask = filter_bits as u64 - 1;
        let mut filter = vec![0u64; filter_bits / 64];
        for key in &keys {
            let slot = key & filter_mask;
            filter[(slot >> 6) as usize] |= 1 << (slot & 63);
        }
        let stats = IndexStats {
            files: self.files,
            items: self.items,
            grams: keys.len(),
            boilerplate,
        };
        BenchmarkIndex {
            settings,
            filter,
            filter_mask,
            keys,
            items,
            buckets,
            shift,
            entries: self.entries,
            stats,
        }
    }
}

impl BenchmarkIndex {
    /// Reads the `files` of every benchmark of `settings` and indexes their items.
    pub async fn build(settings: &Decontamination, files: &BenchmarkFiles) -> Result<Self> {
        let mut builder = Builder::new(settings.n);
        for (b, (benchmark, files)) in settings.benchmarks.iter().zip(&files.0).enumerate() {
            for file in files {
                builder.files += 1;
                let bytes = file
                    .store
                    .get(&file.path)
                    .await
                    .with_context(|| format!("benchmark '{}': {}", benchmark.name, file.display))?
                    .bytes()
                    .await?;
                for (id, fields) in read_items(file, bytes, benchmark)? {
                    builder.item(b, &id, &fields);
                }
            }
        }
        Ok(builder.finish(settings.clone()))
    }

    /// An index of the given items (benchmark, id, field texts) without files: for tests
    /// and benchmarks.
    pub fn of_items<'a>(
        settings: &Decontamination,
        items: impl IntoIterator<Item = (usize, &'a str, Vec<&'a str>)>,
    ) -> Self {
        let mut builder = Builder::new(settings.n);
        for (b, id, fields) in items {
            builder.item(b, id, &fields);
        }
        builder.finish(settings.clone())
    }

    fn lookup(&self, gram: u64) -> Option<u32> {
        let slot = gram & self.filter_mask;
        if self.filter[(slot >> 6) as usize] & (1 << (slot & 63)) == 0 {
            return None;
        }
        let b = (gram >> self.shift) as usize;
        let (start, end) = (self.buckets[b] as usize, self.buckets[b + 1] as usize);
        self.keys[start..end]
            .binary_search(&gram)
            .ok()
            .map(|i| self.items[start + i])
    }

    /// The strongest match of a row's `(column, text)` pairs, if any item field overlaps it
    /// as the settings require.
    pub fn check(&self, columns: &[(&str, &str)]) -> Option<Match> {
        let mut shared: HashMap<u32, (u64, usize)> = HashMap::new();
        for (c, (_, text)) in columns.iter().enumerate() {
            let mut grams = gram_hashes(text, self.settings.n);
            grams.sort_unstable();
            grams.dedup();
            for gram in grams {
                if let Some(entry) = self.lookup(gram) {
                    let counted = shared.entry(entry).or_insert((0, c));
                    counted.0 += 1;
                }
            }
        }
        let (entry, (count, column)) = shared.into_iter().max_by(|a, b| {
            let share = |e: u32, n: u64| n as f64 / f64::from(self.entries[e as usize].grams);
            share(a.0, a.1.0)
                .total_cmp(&share(b.0, b.1.0))
                .then(a.1.0.cmp(&b.1.0))
                .then(b.0.cmp(&a.0))
        })?;
        let found = &self.entries[entry as usize];
        let overlap = count as f64 / f64::from(found.grams);
        let enough = match self.settings.measure {
            Measure::Any => count as f64 >= self.settings.threshold,
            Measure::Share => overlap >= self.settings.threshold,
        };
        let benchmark = &self.settings.benchmarks[found.benchmark as usize];
        enough.then(|| Match {
            benchmark: benchmark.name.clone(),
            item: found.id.clone(),
            field: benchmark.fields[found.field as usize].clone(),
            column: columns[column].0.to_string(),
            shared: count,
            overlap,
        })
    }
}

/// Whether stage SQL checks rows against the benchmarks (and so needs their index, and their
/// files in its fingerprint).
pub fn checks_benchmarks(sql: &str) -> bool {
    sql.contains("benchmark_match(")
}

/// The files of every benchmark, listed once per run: what the fingerprint records and the
/// index reads.
#[derive(Debug, Clone)]
pub struct BenchmarkFiles(Vec<Vec<InputFile>>);

impl BenchmarkFiles {
    /// Lists the files of each benchmark of `settings`.
    pub async fn list(settings: &Decontamination) -> Result<Self> {
        let mut files = Vec::new();
        for benchmark in &settings.benchmarks {
            files.push(benchmark_files(benchmark).await?);
        }
        Ok(Self(files))
    }

    /// A digest of what the files are now (names, sizes, versions), for fingerprints.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for file in self.0.iter().flatten() {
            h.update(format!("{}\0{}\0{}\n", file.display, file.size, file.version).as_bytes());
        }
        hex::encode(&h.finalize()[..12])
    }
}

/// The files of `benchmark`, in a stable order.
async fn benchmark_files(benchmark: &Benchmark) -> Result<Vec<InputFile>> {
    let mut files = Vec::new();
    for path in &benchmark.paths {
        let found = list_inputs(path)
            .await
            .with_context(|| format!("benchmark '{}'", benchmark.name))?;
        if found.is_empty() {
            return Err(Error::Job(format!(
                "benchmark '{}': '{path}' holds no JSONL or Parquet file",
                benchmark.name
            )));
        }
        files.extend(found);
    }
    Ok(files)
}

/// Each item of a benchmark file: its id and the text of each of the benchmark's fields.
fn read_items(
    file: &InputFile,
    bytes: Bytes,
    benchmark: &Benchmark,
) -> Result<Vec<(String, Vec<String>)>> {
    let name = file.path.filename().unwrap_or_default().to_string();
    match file.format {
        InputFormat::Parquet => parquet_items(file, bytes, benchmark, &name),
        format => {
            let text = decompress(format, bytes, file)?;
            let mut items = Vec::new();
            let named: Vec<&String> = benchmark.fields.iter().chain(&benchmark.id).collect();
            let mut seen = vec![false; named.len()];
            let mut keys: Vec<String> = Vec::new();
            for (line_no, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(line).map_err(|e| Error::Input {
                    file: file.display.clone(),
                    line: line_no as u64 + 1,
                    message: format!(
                        "benchmark '{}': not a JSON object ({e}); give JSON lines or Parquet",
                        benchmark.name
                    ),
                })?;
                for (seen, field) in seen.iter_mut().zip(&named) {
                    *seen |= value.get(field.as_str()).is_some();
                }
                if keys.is_empty()
                    && let Some(object) = value.as_object()
                {
                    keys = object.keys().cloned().collect();
                }
                let id = match &benchmark.id {
                    Some(field) => value.get(field).map(value_text).unwrap_or_default(),
                    None => format!("{name}:{}", line_no + 1),
                };
                let fields = benchmark
                    .fields
                    .iter()
                    .map(|f| value.get(f).map(value_text).unwrap_or_default())
                    .collect();
                items.push((id, fields));
            }
            let missing: Vec<&str> = named
                .iter()
                .zip(&seen)
                .filter(|(_, seen)| !**seen)
                .map(|(field, _)| field.as_str())
                .collect();
            if !items.is_empty() && !missing.is_empty() {
                return Err(missing_fields(file, benchmark, &missing, &keys));
            }
            Ok(items)
        }
    }
}

/// A benchmark file none of whose items has some of the fields the job names: a typo there
/// would leave the benchmark unchecked without a word.
fn missing_fields(
    file: &InputFile,
    benchmark: &Benchmark,
    missing: &[&str],
    present: &[String],
) -> Error {
    Error::Input {
        file: file.display.clone(),
        line: 0,
        message: format!(
            "benchmark '{}': no item has the field(s) {} (its items have: {}); fix fields or id in [[decontaminate.benchmarks]]",
            benchmark.name,
            missing.join(", "),
            present.join(", ")
        ),
    }
}

fn decompress(format: InputFormat, bytes: Bytes, file: &InputFile) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    let read = match format {
        InputFormat::JsonlGzip => {
            flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_string(&mut text)
        }
        InputFormat::JsonlZstd => zstd::Decoder::new(&bytes[..])?.read_to_string(&mut text),
        _ => {
            return String::from_utf8(bytes.to_vec()).map_err(|e| Error::Input {
                file: file.display.clone(),
                line: 0,
                message: format!("not UTF-8 text: {e}"),
            });
        }
    };
    read.map_err(|e| Error::Input {
        file: file.display.clone(),
        line: 0,
        message: format!("cannot decompress: {e}"),
    })?;
    Ok(text)
}

/// The text of a JSON value: strings as they are, lists and objects element by element on
/// lines of their own, anything else as JSON.
fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(value_text).collect::<Vec<_>>().join("\n"),
        Value::Object(map) => map.values().map(value_text).collect::<Vec<_>>().join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn parquet_items(
    file: &InputFile,
    bytes: Bytes,
    benchmark: &Benchmark,
    name: &str,
) -> Result<Vec<(String, Vec<String>)>> {
    let unreadable = |e: &dyn std::fmt::Display| Error::Input {
        file: file.display.clone(),
        line: 0,
        message: format!(
            "benchmark '{}': not a readable Parquet file: {e}",
            benchmark.name
        ),
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| unreadable(&e))?;
    let columns: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let missing: Vec<&str> = benchmark
        .fields
        .iter()
        .chain(&benchmark.id)
        .map(String::as_str)
        .filter(|f| !columns.iter().any(|c| c == f))
        .collect();
    if !missing.is_empty() {
        return Err(missing_fields(file, benchmark, &missing, &columns));
    }
    let reader = builder.build().map_err(|e| unreadable(&e))?;
    let mut items = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch.map_err(|e| unreadable(&e))?;
        let texts = |field: &str| -> Result<Vec<String>> {
            let column = batch.column_by_name(field).expect("checked in the schema");
            array_texts(column)
        };
        let fields = benchmark
            .fields
            .iter()
            .map(|f| texts(f))
            .collect::<Result<Vec<_>>>()?;
        let ids = benchmark.id.as_deref().map(texts).transpose()?;
        for row in 0..batch.num_rows() {
            let id = match &ids {
                Some(ids) => ids[row].clone(),
                None => format!("{name}:{}", items.len() + 1),
            };
            items.push((id, fields.iter().map(|f| f[row].clone()).collect()));
        }
    }
    Ok(items)
}

/// The text of each row of `column`: lists element by element on lines of their own, other
/// types cast to text.
fn array_texts(column: &ArrayRef) -> Result<Vec<String>> {
    let rows = column.len();
    match column.data_type() {
        DataType::List(_) | DataType::LargeList(_) => {
            let list = cast(
                column,
                &DataType::List(Arc::new(datafusion::arrow::datatypes::Field::new(
                    "item",
                    DataType::Utf8,
                    true,
                ))),
            )?;
            let list = list.as_list::<i32>();
            Ok((0..rows)
                .map(|i| {
                    if list.is_null(i) {
                        return String::new();
                    }
                    let values = list.value(i);
                    let values = values.as_string::<i32>();
                    values.iter().flatten().collect::<Vec<_>>().join("\n")
                })
                .collect())
        }
        _ => {
            let text = cast(column, &DataType::Utf8)?;
            let text = text.as_string::<i32>();
            Ok((0..rows)
                .map(|i| {
                    text.is_valid(i)
                        .then(|| text.value(i))
                        .unwrap_or("")
                        .to_string()
                })
                .collect())
        }
    }
}
