//! Pairs in the formats trainers read: OpenAI chat JSONL, ShareGPT, Alpaca, and Parquet with
//! a `messages` column.

use super::*;

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

pub(super) fn batch_pairs(batch: &RecordBatch) -> Result<Vec<Pair>> {
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

pub(super) fn tagged_instruction(pair: &Pair, mode: TagMode) -> String {
    match (mode, &pair.tag) {
        (TagMode::Append, Some(tag)) => format!("{}\n\n{tag}", pair.instruction),
        _ => pair.instruction.clone(),
    }
}

pub(super) fn system(pair: &Pair, mode: TagMode) -> Option<&str> {
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
pub(super) fn messages_column<M, C>(
    rows: impl Iterator<Item = M>,
) -> datafusion::arrow::array::ListArray
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
pub(super) fn pair_turns(
    pair: &Pair,
    mode: TagMode,
    response: bool,
) -> Vec<(&'static str, String)> {
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
pub(super) fn parquet_bytes(pairs: &[Pair], mode: TagMode, provenance: bool) -> Result<Vec<u8>> {
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
