//! The dataset card written beside an export: what was exported and how, the job's
//! settings and the run's statistics, as Markdown.

use super::*;

/// Where the card of an export goes: beside the file, under the file's own name
/// (`sft.jsonl` -> `sft.card.md`), so it never takes the place of the folder's README.md.
pub(super) fn card_path(output: &Location) -> object_store::path::Path {
    let path = output.prefix.as_ref();
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    // The whole stem: `run.a.jsonl` and `run.b.jsonl` each have their own card.
    let stem = file.rsplit_once('.').map_or(file, |(stem, _)| stem);
    let name = format!("{stem}.card.md");
    object_store::path::Path::from(if dir.is_empty() {
        name
    } else {
        format!("{dir}/{name}")
    })
}

/// Fails unless the card's place is free or holds a card of ours; checked before anything is
/// written, so a refused export leaves nothing behind.
pub(super) async fn check_card_place(opts: &ExportOptions) -> Result<()> {
    let output = Location::parse(&opts.output)?;
    let card_path = card_path(&output);
    check_card_at(&output, &card_path).await
}

/// Fails unless `card_path` is free or holds a card of ours (its mark in the first lines: a
/// Hub card opens with its YAML header).
pub(super) async fn check_card_at(
    output: &Location,
    card_path: &object_store::path::Path,
) -> Result<()> {
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
pub(super) async fn write_card(opts: &ExportOptions, counts: &ExportCounts) -> Result<()> {
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
pub(super) async fn card_text(
    opts: &ExportOptions,
    counts: &ExportCounts,
    file_name: &str,
) -> Result<String> {
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
pub(super) fn publishable_settings(recorded: &[u8]) -> String {
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
pub(super) fn markdown_text(text: &str) -> std::borrow::Cow<'_, str> {
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
pub(super) fn fence_for(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    "`".repeat(longest.max(2) + 1)
}
