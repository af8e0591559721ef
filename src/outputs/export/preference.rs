//! `--format preference`: chosen and rejected answers as TRL's conversational DPO layout, in
//! JSON lines or Parquet.

use super::*;

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
pub(super) const PREFERENCE_COLUMNS: [&str; 5] = [
    "instruction",
    "chosen",
    "rejected",
    "chosen_score",
    "rejected_score",
];

/// `export --format preference`: the table's preferences as JSON lines, sampled as pairs are.
pub(super) async fn export_preferences(
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

/// The `dataset_info.features` of a `--format hf` folder of preferences.
pub(super) const PREFERENCE_FEATURES: &str = "  - name: id\n    dtype: string\n\
    \x20 - name: prompt\n    list:\n    - name: role\n      dtype: string\n\
    \x20   - name: content\n      dtype: string\n\
    \x20 - name: chosen\n    list:\n    - name: role\n      dtype: string\n\
    \x20   - name: content\n      dtype: string\n\
    \x20 - name: rejected\n    list:\n    - name: role\n      dtype: string\n\
    \x20   - name: content\n      dtype: string\n\
    \x20 - name: score_chosen\n    dtype: float64\n  - name: score_rejected\n    dtype: float64\n";

/// Parquet of `preferences` in TRL's conversational layout, as `--format preference` writes
/// them line by line.
pub(super) fn preference_parquet(preferences: &[Preference], mode: TagMode) -> Result<Vec<u8>> {
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
