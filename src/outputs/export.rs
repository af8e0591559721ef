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
}

impl Pair {
    /// A pair without a tag.
    pub fn untagged(id: &str, instruction: &str, response: &str) -> Self {
        Self {
            id: id.to_string(),
            instruction: instruction.to_string(),
            response: response.to_string(),
            tag: None,
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
    if opts.format == Format::Preference {
        return export_preferences(opts, &ctx).await;
    }
    let mut synthetic = read_pairs(&ctx, &opts.table).await?;
    let available = synthetic.len() as u64;
    if let Some(size) = opts.size {
        if size > synthetic.len() {
            return job_error!(
                "--size {size}: '{}' holds only {} pairs; ask for at most that many",
                opts.table,
                synthetic.len()
            );
        }
        synthetic.sort_by_cached_key(|p| sample_key(opts.sample_seed, "web", &p.id));
        synthetic.truncate(size);
    }
    for pair in &mut synthetic {
        pair.tag = Some(opts.tag_text.clone());
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
    if opts.card {
        check_card_place(opts).await?;
    }
    write_file(&opts.output, encode(&pairs, opts.format, opts.tag)?).await?;
    if opts.card {
        write_card(opts, &counts).await?;
    }
    Ok(counts)
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
    let sql = format!(
        "SELECT id, instruction, {response} AS response FROM {table} \
         WHERE instruction IS NOT NULL AND {response} IS NOT NULL ORDER BY id"
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
    /// The pair's id.
    pub id: String,
    /// The prompt with its tag, as an instruction-tuning pair's.
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
) -> Result<ExportCounts> {
    if opts.seed.is_some() {
        return job_error!(
            "--seed mixes in instruction-tuning pairs, which have no rejected answer: leave it out with --format preference"
        );
    }
    let schema = ctx.table(&opts.table).await?.schema().clone();
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
            let id = text(0).value(row).to_string();
            let number = |i: usize| (!score(i).is_null(row)).then(|| score(i).value(row));
            preferences.push(Preference {
                prompt: Pair {
                    id: id.clone(),
                    instruction: text(1).value(row).to_string(),
                    response: String::new(),
                    tag: Some(opts.tag_text.clone()),
                },
                id,
                chosen: text(2).value(row).to_string(),
                rejected: text(3).value(row).to_string(),
                chosen_score: number(4),
                rejected_score: number(5),
            });
        }
    }
    let available = preferences.len() as u64;
    if let Some(size) = opts.size {
        if size > preferences.len() {
            return job_error!(
                "--size {size}: '{}' holds only {available} preferences; ask for at most that many",
                opts.table
            );
        }
        preferences.sort_by_cached_key(|p| sample_key(opts.sample_seed, "web", &p.id));
        preferences.truncate(size);
    }
    let counts = ExportCounts {
        available,
        synthetic: preferences.len() as u64,
        seed: 0,
    };
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
    let mut prompt = Vec::new();
    if let Some(s) = system(&preference.prompt, mode) {
        prompt.push(json!({"role": "system", "content": s}));
    }
    prompt.push(json!({"role": "user", "content": tagged_instruction(&preference.prompt, mode)}));
    json!({
        "id": preference.id,
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
        return parquet_bytes(pairs, tag);
    }
    if format == Format::Preference {
        return job_error!(
            "--format preference writes preference pairs (`export --table preference`), not instruction-tuning pairs"
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
    Ok((0..batch.num_rows())
        .map(|i| Pair {
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
        Format::OpenaiChat | Format::Parquet | Format::Preference => {
            let mut messages = Vec::new();
            if let Some(s) = system(pair, mode) {
                messages.push(json!({"role": "system", "content": s}));
            }
            messages.push(json!({"role": "user", "content": instruction}));
            messages.push(json!({"role": "assistant", "content": pair.response}));
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

fn parquet_bytes(pairs: &[Pair], mode: TagMode) -> Result<Vec<u8>> {
    use datafusion::arrow::array::{ListBuilder, StringBuilder, StructBuilder};
    use datafusion::arrow::datatypes::{Field, Fields, Schema};
    let message_fields = Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
    ]);
    let mut ids = StringBuilder::new();
    let mut messages = ListBuilder::new(StructBuilder::from_fields(message_fields.clone(), 3))
        .with_field(Arc::new(Field::new(
            "item",
            DataType::Struct(message_fields.clone()),
            false,
        )));
    for pair in pairs {
        ids.append_value(&pair.id);
        let instruction = tagged_instruction(pair, mode);
        let turns = system(pair, mode)
            .map(|s| ("system", s.to_string()))
            .into_iter()
            .chain([("user", instruction), ("assistant", pair.response.clone())]);
        let values = messages.values();
        for (role, content) in turns {
            values
                .field_builder::<StringBuilder>(0)
                .expect("role builder")
                .append_value(role);
            values
                .field_builder::<StringBuilder>(1)
                .expect("content builder")
                .append_value(content);
            values.append(true);
        }
        messages.append(true);
    }
    let messages = messages.finish();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("messages", messages.data_type().clone(), false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(ids.finish()), Arc::new(messages)],
    )?;
    parquet_of(&[batch], schema, None)
}

async fn write_file(output: &str, bytes: Vec<u8>) -> Result<()> {
    let location = Location::parse(output)?;
    location
        .store
        .put(&location.prefix, PutPayload::from(bytes))
        .await?;
    Ok(())
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
    // Only "not found" means there is no card: any other failure must not let us overwrite
    // somebody else's README.
    match output.store.get(&card_path).await {
        Ok(existing) => {
            let bytes = existing.bytes().await?;
            if !bytes.starts_with(CARD_MARK.as_bytes()) {
                return job_error!(
                    "{} exists and was not written by backforth; export into another directory or pass --no-card",
                    output.display(&card_path)
                );
            }
            Ok(())
        }
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::failed(
            format!(
                "checking {} before writing the card",
                output.display(&card_path)
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
    let file_name = output
        .prefix
        .as_ref()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let card = dataset_card(opts, counts, &file_name, &job, &tables);
    output
        .store
        .put(&card_path, PutPayload::from(card.into_bytes()))
        .await?;
    Ok(())
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
    let what = if opts.format == Format::Preference {
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
