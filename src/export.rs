//! Writing final pairs in the formats trainers read: OpenAI chat JSONL, ShareGPT, Alpaca, and
//! Parquet with a `messages` column.

use std::sync::Arc;

use clap::ValueEnum;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::job_err;
use crate::pipeline::open_root;
use crate::storage::Location;

/// The tag BaF and Humpback give synthetic pairs.
pub const WEB_TAG: &str = "Answer with knowledge from web search.";

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
    /// Tag sentence.
    pub tag_text: String,
}

/// One exported pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Row id (candidate id).
    pub id: String,
    /// The instruction.
    pub instruction: String,
    /// The response.
    pub response: String,
}

/// Exports `opts.table` under `opts.root`; returns the number of pairs written.
pub async fn export(opts: &ExportOptions) -> Result<u64> {
    let root = Location::parse(&opts.root)?;
    let (ctx, stages) = open_root(&root).await?;
    if !stages.contains(&opts.table) {
        return job_err!(
            "{} has no complete '{}' stage (complete: {})",
            root.describe(),
            opts.table,
            stages.join(", ")
        );
    }
    let schema = ctx.table(opts.table.as_str()).await?.schema().clone();
    // Rewritten and distilled pairs answer in `response`; filter-only pairs keep the web text.
    let response = if schema.has_column_with_unqualified_name("response") {
        "response"
    } else if schema.has_column_with_unqualified_name("text") {
        "text"
    } else {
        return job_err!(
            "table '{}' has neither a 'response' nor a 'text' column",
            opts.table
        );
    };
    if !schema.has_column_with_unqualified_name("instruction") {
        return job_err!("table '{}' has no 'instruction' column", opts.table);
    }
    let sql = format!(
        "SELECT id, instruction, {response} AS response FROM {} \
         WHERE instruction IS NOT NULL AND {response} IS NOT NULL ORDER BY id",
        opts.table
    );
    let mut stream = ctx.sql(&sql).await?.execute_stream().await?;
    let mut pairs = Vec::new();
    while let Some(batch) = stream.next().await {
        pairs.extend(batch_pairs(&batch?)?);
    }
    let bytes = match opts.format {
        Format::Parquet => parquet_bytes(&pairs, opts)?,
        _ => {
            let mut out = Vec::new();
            for pair in &pairs {
                serde_json::to_writer(&mut out, &render_pair(pair, opts))
                    .map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
                out.push(b'\n');
            }
            out
        }
    };
    write_file(&opts.output, bytes).await?;
    Ok(pairs.len() as u64)
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
        })
        .collect())
}

fn tagged_instruction(pair: &Pair, opts: &ExportOptions) -> String {
    match opts.tag {
        TagMode::Append => format!("{}\n\n{}", pair.instruction, opts.tag_text),
        _ => pair.instruction.clone(),
    }
}

fn system(opts: &ExportOptions) -> Option<&str> {
    (opts.tag == TagMode::System).then_some(opts.tag_text.as_str())
}

/// The JSON object one pair becomes in a JSONL format.
pub fn render_pair(pair: &Pair, opts: &ExportOptions) -> Value {
    let instruction = tagged_instruction(pair, opts);
    match opts.format {
        Format::OpenaiChat | Format::Parquet => {
            let mut messages = Vec::new();
            if let Some(s) = system(opts) {
                messages.push(json!({"role": "system", "content": s}));
            }
            messages.push(json!({"role": "user", "content": instruction}));
            messages.push(json!({"role": "assistant", "content": pair.response}));
            json!({"messages": messages})
        }
        Format::Sharegpt => {
            let mut turns = Vec::new();
            if let Some(s) = system(opts) {
                turns.push(json!({"from": "system", "value": s}));
            }
            turns.push(json!({"from": "human", "value": instruction}));
            turns.push(json!({"from": "gpt", "value": pair.response}));
            json!({"conversations": turns})
        }
        Format::Alpaca => {
            let mut obj = json!({"instruction": instruction, "input": "", "output": pair.response});
            if let Some(s) = system(opts) {
                obj["system"] = json!(s);
            }
            obj
        }
    }
}

fn parquet_bytes(pairs: &[Pair], opts: &ExportOptions) -> Result<Vec<u8>> {
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
        let instruction = tagged_instruction(pair, opts);
        let turns = system(opts)
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
    let mut buf = Vec::new();
    let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None)
        .map_err(|e| Error::Execution(format!("Parquet writer: {e}")))?;
    writer
        .write(&batch)
        .map_err(|e| Error::Execution(format!("writing Parquet: {e}")))?;
    writer
        .close()
        .map_err(|e| Error::Execution(format!("closing Parquet: {e}")))?;
    Ok(buf)
}

async fn write_file(output: &str, bytes: Vec<u8>) -> Result<()> {
    let location = Location::parse(output)?;
    location
        .store
        .put(&location.prefix, PutPayload::from(bytes))
        .await?;
    Ok(())
}
