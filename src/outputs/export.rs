//! Writing final pairs in the formats trainers read: OpenAI chat JSONL, ShareGPT, Alpaca, and
//! Parquet with a `messages` column. Synthetic pairs can be sampled to a size and mixed with
//! seed pairs, each side tagged as the papers do, with a dataset card written beside them.

use std::sync::Arc;

use clap::ValueEnum;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::job_error;
use crate::root::names::JOB_FILE;
use crate::root::objects::parquet_of;
use crate::root::tables::{open_root, register_seed};
use crate::storage::Location;

/// The tag BaF and Humpback give synthetic pairs.
pub const WEB_TAG: &str = "Answer with knowledge from web search.";

/// The tag BaF and Humpback give seed pairs.
pub const SEED_TAG: &str = "Answer in the style of an AI Assistant.";

/// First line of a dataset card written by `export`; an existing card file without it is
/// someone else's and is never overwritten.
const CARD_MARK: &str = "<!-- written by backforth export -->";

/// Output formats of `backforth export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `{"messages": [{"role": ..., "content": ...}, ...]}` per line.
    OpenaiChat,
    /// `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}` per line.
    Sharegpt,
    /// `{"instruction", "input", "output"[, "system"]}` per line.
    Alpaca,
    /// Parquet with `id` and a `messages` list of (role, content) structs.
    Parquet,
    /// Preference pairs for DPO (TRL's conversational layout): `prompt`, `chosen` and
    /// `rejected` message lists per line, with `score_chosen` and `score_rejected`.
    Preference,
    /// A folder Hugging Face `datasets.load_dataset` reads as it is:
    /// `data/<split>-NNNNN-of-NNNNN.parquet` with `messages` and provenance columns, and a
    /// README.md card with the Hub's YAML header.
    Hf,
}

impl Format {
    /// File extension of the format.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            _ => "jsonl",
        }
    }
}

/// Where the tag sentence goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TagMode {
    /// No tag.
    None,
    /// As a system message (Alpaca: a `system` field).
    System,
    /// Appended to the instruction after a blank line.
    Append,
}

/// What to export and how.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Output root of a run.
    pub root: String,
    /// Stage table holding the pairs (`rewritten`, `curated`, `distilled`, ...).
    pub table: String,
    /// Output format.
    pub format: Format,
    /// Output file (path or URL).
    pub output: String,
    /// Tag placement.
    pub tag: TagMode,
    /// Tag sentence of the synthetic pairs.
    pub tag_text: String,
    /// Directory written by `backforth seed`, whose pairs are mixed in.
    pub seed: Option<String>,
    /// Tag sentence of the seed pairs.
    pub seed_tag_text: String,
    /// Synthetic pairs to sample (all when `None`).
    pub size: Option<usize>,
    /// Seed of the sampling and of the mixed order.
    pub sample_seed: u64,
    /// Write a dataset card (`<name>.card.md`) beside the output.
    pub card: bool,
    /// `--format hf`: the share of pairs held out as the `test` split.
    pub test_fraction: f64,
    /// `--format hf`: the license the card declares.
    pub license: String,
}

/// One exported pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Row id (candidate id, or the seed reply's message id).
    pub id: String,
    /// The instruction.
    pub instruction: String,
    /// The response.
    pub response: String,
    /// The tag sentence of the pair's origin, placed as the export's tag mode says.
    pub tag: Option<String>,
    /// `web` (synthetic) or `seed`.
    pub origin: &'static str,
    /// The pair's score, when its table has one.
    pub score: Option<f64>,
    /// The web document it was made from, when its table says.
    pub doc_id: Option<String>,
}

impl Pair {
    /// A pair without a tag.
    pub fn untagged(id: &str, instruction: &str, response: &str) -> Self {
        Self {
            id: id.to_string(),
            instruction: instruction.to_string(),
            response: response.to_string(),
            tag: None,
            origin: "seed",
            score: None,
            doc_id: None,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportCounts {
    /// Synthetic pairs available in the table.
    pub available: u64,
    /// Synthetic pairs written.
    pub synthetic: u64,
    /// Seed pairs written.
    pub seed: u64,
    /// Whether they are preferences (chosen and rejected answers) rather than pairs.
    pub preferences: bool,
}

/// Exports `opts.table` under `opts.root`, sampled and mixed with seed pairs as asked.
pub async fn export(opts: &ExportOptions) -> Result<ExportCounts> {
    let root = Location::parse(&opts.root)?;
    let (ctx, stages) = open_root(&root).await?;
    if !stages.contains(&opts.table) {
        return job_error!(
            "{} has no complete '{}' stage (complete: {})",
            root.describe(),
            opts.table,
            stages.join(", ")
        );
    }
    let schema = ctx.table(&opts.table).await?.schema().clone();
    let preferences = schema.has_column_with_unqualified_name("chosen")
        && schema.has_column_with_unqualified_name("rejected");
    if opts.format == Format::Preference || (opts.format == Format::Hf && preferences) {
        return export_preferences(opts, &ctx, &schema).await;
    }
    let mut synthetic = read_pairs(&ctx, &opts.table).await?;
    let available = synthetic.len() as u64;
    sample(opts, &mut synthetic, |p| &p.id, "pairs")?;
    for pair in &mut synthetic {
        pair.tag = Some(opts.tag_text.clone());
        pair.origin = "web";
    }
    let mut seed = match &opts.seed {
        Some(dir) => read_seed(dir).await?,
        None => Vec::new(),
    };
    for pair in &mut seed {
        pair.tag = Some(opts.seed_tag_text.clone());
    }
    let counts = ExportCounts {
        available,
        synthetic: synthetic.len() as u64,
        seed: seed.len() as u64,
        preferences: false,
    };
    let mut pairs: Vec<(String, Pair)> = seed
        .into_iter()
        .map(|p| (sample_key(opts.sample_seed, "seed", &p.id), p))
        .chain(
            synthetic
                .into_iter()
                .map(|p| (sample_key(opts.sample_seed, "web", &p.id), p)),
        )
        .collect();
    // Without a seed the order is the table's (by id); mixed, the two origins interleave in
    // an order fixed by the sampling seed.
    if opts.seed.is_some() {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let pairs: Vec<Pair> = pairs.into_iter().map(|(_, p)| p).collect();
    if opts.format == Format::Hf {
        let encode = |chunk: &[Pair]| parquet_bytes(chunk, opts.tag, true);
        write_hf(opts, &pairs, |p| &p.id, encode, PAIR_FEATURES, &counts).await?;
        return Ok(counts);
    }
    if opts.card {
        check_card_place(opts).await?;
    }
    write_file(&opts.output, encode(&pairs, opts.format, opts.tag)?).await?;
    if opts.card {
        write_card(opts, &counts).await?;
    }
    Ok(counts)
}

/// `--size N`: keeps the N `rows` (of `what`, for the message) that come first by their
/// [`sample_key`]; all of them without `--size`.
fn sample<T>(
    opts: &ExportOptions,
    rows: &mut Vec<T>,
    id: impl Fn(&T) -> &str,
    what: &str,
) -> Result<()> {
    let Some(size) = opts.size else {
        return Ok(());
    };
    if size > rows.len() {
        return job_error!(
            "--size {size}: '{}' holds only {} {what}; ask for at most that many",
            opts.table,
            rows.len()
        );
    }
    rows.sort_by_cached_key(|row| sample_key(opts.sample_seed, "web", id(row)));
    rows.truncate(size);
    Ok(())
}

/// Where a pair falls in a sample: a hash of the sampling seed, its origin and its id, so the
/// same seed picks the same pairs whatever order the table is read in.
fn sample_key(seed: u64, origin: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(
        format!("{seed}\u{0}{origin}\u{0}{id}").as_bytes(),
    ))
}

async fn read_pairs(ctx: &datafusion::prelude::SessionContext, table: &str) -> Result<Vec<Pair>> {
    let schema = ctx.table(table).await?.schema().clone();
    // Rewritten and distilled pairs answer in `response`; filter-only pairs keep the web text.
    let response = if schema.has_column_with_unqualified_name("response") {
        "response"
    } else if schema.has_column_with_unqualified_name("text") {
        "text"
    } else {
        return job_error!("table '{table}' has neither a 'response' nor a 'text' column");
    };
    if !schema.has_column_with_unqualified_name("instruction") {
        return job_error!("table '{table}' has no 'instruction' column");
    }
    let optional = |column: &str, as_type: &str| {
        if schema.has_column_with_unqualified_name(column) {
            format!("CAST({column} AS {as_type})")
        } else {
            format!("CAST(NULL AS {as_type})")
        }
    };
    let sql = format!(
        "SELECT id, instruction, {response} AS response, {} AS score, {} AS doc_id \
         FROM {table} WHERE instruction IS NOT NULL AND {response} IS NOT NULL ORDER BY id",
        optional("score", "DOUBLE"),
        optional("doc_id", "VARCHAR"),
    );
    let mut stream = ctx.sql(&sql).await?.execute_stream().await?;
    let mut pairs = Vec::new();
    while let Some(batch) = stream.next().await {
        pairs.extend(batch_pairs(&batch?)?);
    }
    Ok(pairs)
}

async fn read_seed(dir: &str) -> Result<Vec<Pair>> {
    let ctx = datafusion::prelude::SessionContext::new();
    register_seed(&ctx, dir).await?;
    read_pairs(&ctx, "seed").await
}

/// One preference: a prompt, the answer preferred and the one rejected, with their scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Preference {
    /// The prompt with its id and tag, as an instruction-tuning pair's.
    pub prompt: Pair,
    /// The preferred answer.
    pub chosen: String,
    /// The rejected answer.
    pub rejected: String,
    /// The chosen answer's score.
    pub chosen_score: Option<f64>,
    /// The rejected answer's score.
    pub rejected_score: Option<f64>,
}

/// The columns a preference table needs, beside `id`.
const PREFERENCE_COLUMNS: [&str; 5] = [
    "instruction",
    "chosen",
    "rejected",
    "chosen_score",
    "rejected_score",
];

/// `export --format preference`: the table's preferences as JSON lines, sampled as pairs are.
async fn export_preferences(
    opts: &ExportOptions,
    ctx: &datafusion::prelude::SessionContext,
    schema: &datafusion::common::DFSchema,
) -> Result<ExportCounts> {
    if opts.seed.is_some() {
        return job_error!(
            "--seed mixes in instruction-tuning pairs, which have no rejected answer: leave it out when exporting preferences"
        );
    }
    let missing: Vec<&str> = PREFERENCE_COLUMNS
        .iter()
        .copied()
        .filter(|c| !schema.has_column_with_unqualified_name(c))
        .collect();
    if !missing.is_empty() {
        return job_error!(
            "table '{}' lacks {} for --format preference: it needs {} (see examples/preference.toml)",
            opts.table,
            missing.join(", "),
            PREFERENCE_COLUMNS.join(", ")
        );
    }
    let sql = format!(
        "SELECT id, instruction, chosen, rejected, chosen_score, rejected_score FROM {} \
         WHERE instruction IS NOT NULL AND chosen IS NOT NULL AND rejected IS NOT NULL \
         ORDER BY id",
        opts.table
    );
    let mut stream = ctx.sql(&sql).await?.execute_stream().await?;
    let mut preferences = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let as_type = |i: usize, t: &DataType| cast(batch.column(i), t);
        let texts = (0..4)
            .map(|i| as_type(i, &DataType::Utf8))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let scores = (4..6)
            .map(|i| as_type(i, &DataType::Float64))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let text = |i: usize| texts[i].as_string::<i32>();
        let score =
            |i: usize| scores[i - 4].as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        for row in 0..batch.num_rows() {
            let number = |i: usize| (!score(i).is_null(row)).then(|| score(i).value(row));
            preferences.push(Preference {
                prompt: Pair {
                    tag: Some(opts.tag_text.clone()),
                    origin: "web",
                    ..Pair::untagged(text(0).value(row), text(1).value(row), "")
                },
                chosen: text(2).value(row).to_string(),
                rejected: text(3).value(row).to_string(),
                chosen_score: number(4),
                rejected_score: number(5),
            });
        }
    }
    let available = preferences.len() as u64;
    sample(opts, &mut preferences, |p| &p.prompt.id, "preferences")?;
    let counts = ExportCounts {
        available,
        synthetic: preferences.len() as u64,
        seed: 0,
        preferences: true,
    };
    if opts.format == Format::Hf {
        let encode = |chunk: &[Preference]| preference_parquet(chunk, opts.tag);
        write_hf(
            opts,
            &preferences,
            |p| &p.prompt.id,
            encode,
            PREFERENCE_FEATURES,
            &counts,
        )
        .await?;
        return Ok(counts);
    }
    if opts.card {
        check_card_place(opts).await?;
    }
    let mut out = Vec::new();
    for preference in &preferences {
        serde_json::to_writer(&mut out, &render_preference(preference, opts.tag))
            .map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
        out.push(b'\n');
    }
    write_file(&opts.output, out).await?;
    if opts.card {
        write_card(opts, &counts).await?;
    }
    Ok(counts)
}

/// The JSON object one preference becomes: TRL's conversational DPO layout (a `prompt` of
/// user and system messages, `chosen` and `rejected` as one assistant message each).
pub fn render_preference(preference: &Preference, mode: TagMode) -> Value {
    let prompt: Vec<Value> = pair_turns(&preference.prompt, mode, false)
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    json!({
        "id": preference.prompt.id,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": preference.chosen}],
        "rejected": [{"role": "assistant", "content": preference.rejected}],
        "score_chosen": preference.chosen_score,
        "score_rejected": preference.rejected_score,
    })
}

/// The pairs in `format`: JSON lines, or Parquet with a `messages` column.
pub fn encode(pairs: &[Pair], format: Format, tag: TagMode) -> Result<Vec<u8>> {
    if format == Format::Parquet {
        return parquet_bytes(pairs, tag, false);
    }
    if matches!(format, Format::Preference | Format::Hf) {
        return job_error!(
            "--format {}: not a file format for these pairs (preference writes `export --table preference`; hf writes a folder with `export`)",
            format
                .to_possible_value()
                .map_or(String::new(), |v| v.get_name().to_string())
        );
    }
    let mut out = Vec::new();
    for pair in pairs {
        serde_json::to_writer(&mut out, &render_pair(pair, format, tag))
            .map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
        out.push(b'\n');
    }
    Ok(out)
}

fn batch_pairs(batch: &RecordBatch) -> Result<Vec<Pair>> {
    let col = |i: usize| -> Result<_> { Ok(cast(batch.column(i), &DataType::Utf8)?) };
    let (ids, instructions, responses) = (col(0)?, col(1)?, col(2)?);
    let (ids, instructions, responses) = (
        ids.as_string::<i32>(),
        instructions.as_string::<i32>(),
        responses.as_string::<i32>(),
    );
    let scores = cast(batch.column(3), &DataType::Float64)?;
    let scores = scores.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
    let doc_ids = col(4)?;
    let doc_ids = doc_ids.as_string::<i32>();
    Ok((0..batch.num_rows())
        .map(|i| Pair {
            origin: "seed",
            score: scores.is_valid(i).then(|| scores.value(i)),
            doc_id: doc_ids.is_valid(i).then(|| doc_ids.value(i).to_string()),
            id: if ids.is_null(i) {
                String::new()
            } else {
                ids.value(i).to_string()
            },
            instruction: instructions.value(i).to_string(),
            response: responses.value(i).to_string(),
            tag: None,
        })
        .collect())
}

fn tagged_instruction(pair: &Pair, mode: TagMode) -> String {
    match (mode, &pair.tag) {
        (TagMode::Append, Some(tag)) => format!("{}\n\n{tag}", pair.instruction),
        _ => pair.instruction.clone(),
    }
}

fn system(pair: &Pair, mode: TagMode) -> Option<&str> {
    pair.tag.as_deref().filter(|_| mode == TagMode::System)
}

/// The JSON object one pair becomes in a JSONL format.
pub fn render_pair(pair: &Pair, format: Format, mode: TagMode) -> Value {
    let instruction = tagged_instruction(pair, mode);
    match format {
        // A pair has no rejected answer: as a preference file's prompt it is a chat.
        Format::OpenaiChat | Format::Parquet | Format::Preference | Format::Hf => {
            let messages: Vec<Value> = pair_turns(pair, mode, true)
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect();
            json!({"messages": messages})
        }
        Format::Sharegpt => {
            let mut turns = Vec::new();
            if let Some(s) = system(pair, mode) {
                turns.push(json!({"from": "system", "value": s}));
            }
            turns.push(json!({"from": "human", "value": instruction}));
            turns.push(json!({"from": "gpt", "value": pair.response}));
            json!({"conversations": turns})
        }
        Format::Alpaca => {
            let mut obj = json!({"instruction": instruction, "input": "", "output": pair.response});
            if let Some(s) = system(pair, mode) {
                obj["system"] = json!(s);
            }
            obj
        }
    }
}

/// A column of message lists, one list of (role, content) per row.
fn messages_column<M, C>(rows: impl Iterator<Item = M>) -> datafusion::arrow::array::ListArray
where
    M: IntoIterator<Item = (&'static str, C)>,
    C: AsRef<str>,
{
    use datafusion::arrow::array::{ListBuilder, StringBuilder, StructBuilder};
    use datafusion::arrow::datatypes::{Field, Fields};
    let message_fields = Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
    ]);
    let mut messages =
        ListBuilder::new(StructBuilder::from_fields(message_fields.clone(), 3)).with_field(
            Arc::new(Field::new("item", DataType::Struct(message_fields), false)),
        );
    for turns in rows {
        let values = messages.values();
        for (role, content) in turns {
            values
                .field_builder::<StringBuilder>(0)
                .expect("role builder")
                .append_value(role);
            values
                .field_builder::<StringBuilder>(1)
                .expect("content builder")
                .append_value(content.as_ref());
            values.append(true);
        }
        messages.append(true);
    }
    messages.finish()
}

/// The messages of a pair: the tag as a system message when `mode` says, the instruction
/// (with the tag appended when `mode` says), then the answer unless `response` is false.
fn pair_turns(pair: &Pair, mode: TagMode, response: bool) -> Vec<(&'static str, String)> {
    let mut turns: Vec<(&'static str, String)> = system(pair, mode)
        .map(|s| ("system", s.to_string()))
        .into_iter()
        .collect();
    turns.push(("user", tagged_instruction(pair, mode)));
    if response {
        turns.push(("assistant", pair.response.clone()));
    }
    turns
}

/// Parquet of `pairs`: `id` and `messages`, and with `provenance` their `origin`, `tag`,
/// `score` and `doc_id`.
fn parquet_bytes(pairs: &[Pair], mode: TagMode, provenance: bool) -> Result<Vec<u8>> {
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::{Field, Schema};
    let messages = messages_column(pairs.iter().map(|p| pair_turns(p, mode, true)));
    let ids = StringArray::from_iter_values(pairs.iter().map(|p| p.id.as_str()));
    let mut fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("messages", messages.data_type().clone(), false),
    ];
    let mut columns: Vec<datafusion::arrow::array::ArrayRef> =
        vec![Arc::new(ids), Arc::new(messages)];
    if provenance {
        use datafusion::arrow::array::Float64Array;
        fields.extend([
            Field::new("origin", DataType::Utf8, false),
            Field::new("tag", DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
            Field::new("doc_id", DataType::Utf8, true),
        ]);
        columns.extend([
            Arc::new(StringArray::from_iter_values(
                pairs.iter().map(|p| p.origin),
            )) as _,
            Arc::new(
                pairs
                    .iter()
                    .map(|p| p.tag.as_deref())
                    .collect::<StringArray>(),
            ) as _,
            Arc::new(pairs.iter().map(|p| p.score).collect::<Float64Array>()) as _,
            Arc::new(
                pairs
                    .iter()
                    .map(|p| p.doc_id.as_deref())
                    .collect::<StringArray>(),
            ) as _,
        ]);
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    parquet_of(&[batch], schema, None)
}

/// The `dataset_info.features` of a `--format hf` folder of pairs.
const PAIR_FEATURES: &str = "  - name: id\n    dtype: string\n  - name: messages\n    list:\n\
    \x20   - name: role\n      dtype: string\n    - name: content\n      dtype: string\n\
    \x20 - name: origin\n    dtype: string\n  - name: tag\n    dtype: string\n\
    \x20 - name: score\n    dtype: float64\n  - name: doc_id\n    dtype: string\n";

/// The `dataset_info.features` of a `--format hf` folder of preferences.
const PREFERENCE_FEATURES: &str = "  - name: id\n    dtype: string\n\
    \x20 - name: prompt\n    list:\n    - name: role\n      dtype: string\n\
    \x20   - name: content\n      dtype: string\n\
    \x20 - name: chosen\n    list:\n    - name: role\n      dtype: string\n\
    \x20   - name: content\n      dtype: string\n\
    \x20 - name: rejected\n    list:\n    - name: role\n      dtype: string\n\
    \x20   - name: content\n      dtype: string\n\
    \x20 - name: score_chosen\n    dtype: float64\n  - name: score_rejected\n    dtype: float64\n";

/// Parquet of `preferences` in TRL's conversational layout, as `--format preference` writes
/// them line by line.
fn preference_parquet(preferences: &[Preference], mode: TagMode) -> Result<Vec<u8>> {
    use datafusion::arrow::array::{ArrayRef, Float64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    let prompt = messages_column(
        preferences
            .iter()
            .map(|p| pair_turns(&p.prompt, mode, false)),
    );
    let answer = |pick: fn(&Preference) -> &str| {
        messages_column(preferences.iter().map(|p| [("assistant", pick(p))]))
    };
    let (chosen, rejected) = (answer(|p| &p.chosen), answer(|p| &p.rejected));
    let list = prompt.data_type().clone();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("prompt", list.clone(), false),
        Field::new("chosen", list.clone(), false),
        Field::new("rejected", list, false),
        Field::new("score_chosen", DataType::Float64, true),
        Field::new("score_rejected", DataType::Float64, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            preferences.iter().map(|p| p.prompt.id.as_str()),
        )),
        Arc::new(prompt),
        Arc::new(chosen),
        Arc::new(rejected),
        Arc::new(
            preferences
                .iter()
                .map(|p| p.chosen_score)
                .collect::<Float64Array>(),
        ),
        Arc::new(
            preferences
                .iter()
                .map(|p| p.rejected_score)
                .collect::<Float64Array>(),
        ),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    parquet_of(&[batch], schema, None)
}

/// Rows per Parquet file of a `--format hf` folder.
const HF_ROWS_PER_FILE: usize = 100_000;

/// `--format hf`: the pairs as `data/<split>-NNNNN-of-NNNNN.parquet` under the output folder,
/// `test` holding `test_fraction` of them (chosen by a hash of the sampling seed and the id),
/// and README.md, the card, with the YAML header the Hub and `datasets` read.
async fn write_hf<T: Clone>(
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
    for (file, bytes) in files {
        folder
            .store
            .put(&folder.path(&file), PutPayload::from(bytes))
            .await?;
    }
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

/// Whether the row `id` goes to the `test` split: a hash of the sampling seed and the id
/// below `fraction`, so the same seed splits alike.
fn is_held_out(seed: u64, fraction: f64, id: &str) -> bool {
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

async fn write_file(output: &str, bytes: Vec<u8>) -> Result<()> {
    let location = Location::parse(output)?;
    location
        .store
        .put(&location.prefix, PutPayload::from(bytes))
        .await?;
    Ok(())
}

/// The last name of a location's path: the file, or the folder, an export writes.
fn last_name(location: &Location) -> &str {
    location
        .prefix
        .as_ref()
        .rsplit('/')
        .next()
        .unwrap_or_default()
}

/// Where the card of an export goes: beside the file, under the file's own name
/// (`sft.jsonl` -> `sft.card.md`), so it never takes the place of the folder's README.md.
fn card_path(output: &Location) -> object_store::path::Path {
    let path = output.prefix.as_ref();
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    let stem = file.split_once('.').map_or(file, |(stem, _)| stem);
    let name = format!("{stem}.card.md");
    object_store::path::Path::from(if dir.is_empty() {
        name
    } else {
        format!("{dir}/{name}")
    })
}

/// Fails unless the card's place is free or holds a card of ours; checked before anything is
/// written, so a refused export leaves nothing behind.
async fn check_card_place(opts: &ExportOptions) -> Result<()> {
    let output = Location::parse(&opts.output)?;
    let card_path = card_path(&output);
    check_card_at(&output, &card_path).await
}

/// Fails unless `card_path` is free or holds a card of ours (its mark in the first lines: a
/// Hub card opens with its YAML header).
async fn check_card_at(output: &Location, card_path: &object_store::path::Path) -> Result<()> {
    // Only "not found" means there is no card: any other failure must not let us overwrite
    // somebody else's file.
    match output.store.get(card_path).await {
        Ok(existing) => {
            let bytes = existing.bytes().await?;
            let head = &bytes[..bytes.len().min(64 * 1024)];
            let ours = head
                .windows(CARD_MARK.len())
                .any(|w| w == CARD_MARK.as_bytes());
            if !ours {
                return job_error!(
                    "{} exists and was not written by backforth; export into another directory or pass --no-card",
                    output.display(card_path)
                );
            }
            Ok(())
        }
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::failed(
            format!(
                "checking {} before writing the card",
                output.display(card_path)
            ),
            e,
        )),
    }
}

/// Writes the card beside the output: what was exported and how, the job's settings, and
/// the `stats` tables of the run.
async fn write_card(opts: &ExportOptions, counts: &ExportCounts) -> Result<()> {
    let output = Location::parse(&opts.output)?;
    let card_path = card_path(&output);
    let card = card_text(opts, counts, last_name(&output)).await?;
    output
        .store
        .put(&card_path, PutPayload::from(card.into_bytes()))
        .await?;
    Ok(())
}

/// The card of an export of `file_name`, with the run's recorded settings and statistics.
async fn card_text(opts: &ExportOptions, counts: &ExportCounts, file_name: &str) -> Result<String> {
    let root = Location::parse(&opts.root)?;
    let job = match root.store.get(&root.path(JOB_FILE)).await {
        Ok(got) => publishable_settings(&got.bytes().await?),
        Err(object_store::Error::NotFound { .. }) => "(not recorded)".to_string(),
        Err(e) => return Err(e.into()),
    };
    let tables = crate::outputs::stats::stats(
        &opts.root,
        &crate::outputs::stats::StatsOptions {
            seed: opts.seed.as_deref(),
            ..Default::default()
        },
    )
    .await?;
    Ok(dataset_card(opts, counts, file_name, &job, &tables))
}

/// The text of a dataset card.
pub fn dataset_card(
    opts: &ExportOptions,
    counts: &ExportCounts,
    file_name: &str,
    job: &str,
    tables: &[crate::outputs::stats::Table],
) -> String {
    use std::fmt::Write as _;
    let mut card = format!("{CARD_MARK}\n# {}\n\n", markdown_text(file_name));
    // The run's folder by its name only: a local path says whose machine made it.
    let run = opts
        .root
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let what = if counts.preferences {
        "Preference pairs (a prompt, the answer chosen and the one rejected, with their scores)"
    } else {
        "Instruction-tuning pairs"
    };
    let _ = writeln!(
        card,
        "{what} made by backforth (instruction back-and-forth translation) from the run `{}`, \
         table `{}`.\n",
        markdown_text(run),
        markdown_text(&opts.table)
    );
    let _ = writeln!(card, "| | |\n|---|---|");
    let _ = writeln!(card, "| format | {:?} |", opts.format);
    let _ = writeln!(
        card,
        "| synthetic pairs | {} (of {} in `{}`{}) |",
        counts.synthetic,
        counts.available,
        opts.table,
        opts.size.map_or(String::new(), |_| format!(
            ", sampled with seed {}",
            opts.sample_seed
        ))
    );
    let _ = writeln!(card, "| seed pairs | {} |", counts.seed);
    let _ = writeln!(card, "| tag placement | {:?} |", opts.tag);
    let _ = writeln!(
        card,
        "| synthetic tag | {} |",
        markdown_text(&opts.tag_text)
    );
    if counts.seed > 0 {
        let _ = writeln!(
            card,
            "| seed tag | {} |",
            markdown_text(&opts.seed_tag_text)
        );
    }
    let fence = fence_for(job);
    let _ = writeln!(card, "\n## Job\n\n{fence}json\n{}\n{fence}\n", job.trim());
    let _ = writeln!(card, "## Statistics of the run\n");
    for table in tables {
        let _ = writeln!(card, "### {}\n", markdown_text(&table.title));
        if let Some(why) = &table.skipped {
            let _ = writeln!(card, "_skipped: {why}_\n");
            continue;
        }
        let cell = |c: &str| markdown_text(c).into_owned();
        let _ = writeln!(
            card,
            "| {} |\n|{}",
            table
                .columns
                .iter()
                .map(|c| cell(c))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(table.columns.len())
        );
        for row in &table.rows {
            let _ = writeln!(
                card,
                "| {} |",
                row.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
            );
        }
        card.push('\n');
    }
    card
}

/// The run's recorded settings as a card publishes them: models' names and decoding, stages,
/// thresholds and prepare rules; not models' `extra` body fields or the job's `params`, which
/// may hold anything, and a tokenizer by its file name, not its path on this machine.
fn publishable_settings(recorded: &[u8]) -> String {
    let Ok(mut job) = serde_json::from_slice::<Value>(recorded) else {
        return "(unreadable)".to_string();
    };
    if let Some(models) = job.get_mut("models").and_then(Value::as_object_mut) {
        for model in models.values_mut() {
            if let Some(model) = model.as_object_mut() {
                model.remove("extra");
            }
        }
    }
    if let Some(job) = job.as_object_mut() {
        job.remove("params");
    }
    if let Some(tokenizer) = job.pointer_mut("/prepare/tokenizer")
        && let Some(path) = tokenizer.as_str()
    {
        let name = path.rsplit(['/', '\\']).next().unwrap_or(path).to_string();
        *tokenizer = Value::String(name);
    }
    serde_json::to_string_pretty(&job).unwrap_or_default()
}

/// `text` safe inside a Markdown table cell or heading: no HTML, comment, code span, table
/// break or line break of its own, control characters escaped.
fn markdown_text(text: &str) -> std::borrow::Cow<'_, str> {
    let special = |c: char| "<>&`|*_[]\\\n\r".contains(c) || c.is_control();
    if !text.chars().any(special) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in crate::escape::escape_control(&text.replace(['\n', '\r'], " ")).chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '`' | '|' | '*' | '_' | '[' | ']' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A code fence longer than any run of backticks in `text`, so nothing in it closes the
/// block early.
fn fence_for(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    "`".repeat(longest.max(2) + 1)
}
