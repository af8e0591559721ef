//! `backforth stats`: the funnel of a run and the analytics queries of `sql/analytics/` (plus
//! any a user adds), as tables for the terminal, JSON or CSV.
//!
//! An analytics file is one SQL query; its first comment line is the table's title, and a
//! `-- requires: a, b` line names the stage tables it needs (it is skipped, and says so, when
//! one is missing).

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use object_store::ObjectStoreExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::job::catalog::Catalog;
use crate::prepare::tokens::TokenCounter;
use crate::root::marker::{StageStats, read_stage_stats};
use crate::root::names::JOB_FILE;
use crate::root::tables::{open_root, register_seed};
use crate::storage::Location;

/// The built-in analytics queries, in order.
const BUILTIN: &[(&str, &str)] = &[
    (
        "10_score_histogram.sql",
        include_str!("../../sql/analytics/10_score_histogram.sql"),
    ),
    (
        "12_score_transitions.sql",
        include_str!("../../sql/analytics/12_score_transitions.sql"),
    ),
    (
        "20_yield.sql",
        include_str!("../../sql/analytics/20_yield.sql"),
    ),
    (
        "30_lengths.sql",
        include_str!("../../sql/analytics/30_lengths.sql"),
    ),
    (
        "40_diversity.sql",
        include_str!("../../sql/analytics/40_diversity.sql"),
    ),
    (
        "50_rewrite_overlap.sql",
        include_str!("../../sql/analytics/50_rewrite_overlap.sql"),
    ),
    (
        "60_judge_agreement.sql",
        include_str!("../../sql/analytics/60_judge_agreement.sql"),
    ),
    (
        "70_dropped.sql",
        include_str!("../../sql/analytics/70_dropped.sql"),
    ),
    (
        "75_contamination.sql",
        include_str!("../../sql/analytics/75_contamination.sql"),
    ),
    (
        "80_preference_gap.sql",
        include_str!("../../sql/analytics/80_preference_gap.sql"),
    ),
];

/// A set of pairs the lengths and diversity queries compare: a table and the SQL of its
/// instruction and response.
#[derive(Debug, Clone, Serialize)]
struct Subset {
    name: String,
    instruction: String,
    response: String,
}

/// One table of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    /// What the table shows.
    pub title: String,
    /// Column names.
    pub columns: Vec<String>,
    /// Rows of rendered values (empty string for NULL).
    pub rows: Vec<Vec<String>>,
    /// Why the table is empty, when it was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Computes the funnel and every analytics query for the run under `root`.
pub async fn stats(root: &str, opts: &StatsOptions<'_>) -> Result<Vec<Table>> {
    let root = Location::parse(root)?;
    let (ctx, mut stages) = open_root(&root).await?;
    let order = crate::run::manifest::read(&root)
        .await?
        .map(|m| m.order)
        .filter(|o| !o.is_empty())
        .unwrap_or_else(|| {
            Catalog::builtin()
                .stages
                .iter()
                .map(|s| s.name.to_string())
                .collect()
        });
    stages.sort_by_key(|s| {
        (
            order.iter().position(|o| o == s).unwrap_or(order.len()),
            s.clone(),
        )
    });
    let funnel = funnel(&root, &stages).await?;
    if let Some(path) = opts.labels {
        ctx.register_batch("labels", read_labels(path)?)?;
        stages.push("labels".to_string());
    }
    if let Some(seed) = opts.seed {
        register_seed(&ctx, seed).await?;
        stages.push("seed".to_string());
    }
    let (tokens, token_label) = tokenizer(&root, opts.tokenizer).await?;
    for udf in crate::engine::session::scalar_udfs(tokens, Default::default()) {
        ctx.register_udf(udf);
    }
    let subsets = subsets(&ctx, &stages).await?;
    let rewrites = rewrites(&ctx, &stages).await?;
    let dropped = dropped(&ctx, &stages).await?;
    // Equal sample size for diversity: the smallest subset's, unless the user sets one.
    let mut smallest = u64::MAX;
    for subset in &subsets {
        let rows = ctx.table(subset.name.as_str()).await?.count().await? as u64;
        smallest = smallest.min(rows);
    }
    let sample = opts
        .sample
        .unwrap_or(if smallest == u64::MAX { 0 } else { smallest });
    let mut tables = vec![funnel];
    let mut queries: Vec<(String, String)> = BUILTIN
        .iter()
        .map(|(n, q)| (n.to_string(), q.to_string()))
        .collect();
    if let Some(dir) = opts.analytics {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| Error::Job(format!("analytics directory {}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        for file in files {
            let sql = std::fs::read_to_string(&file)?;
            queries.push((file.display().to_string(), sql));
        }
    }
    for (name, template) in queries {
        let sql = minijinja::Environment::new()
            .render_str(
                &template,
                minijinja::context! {
                    sample => sample, stages => &stages, rewrites => &rewrites,
                    dropped => &dropped,
                    subsets => minijinja::Value::from(minijinja::value::Serde(&subsets)),
                },
            )
            .map_err(|e| Error::Job(format!("analytics query {name}: {e}")))?;
        let mut table = run_query(&ctx, &name, &sql, &stages).await?;
        if sql.contains("token_count(") {
            table.title = format!("{} [tokens: {token_label}]", table.title);
        }
        tables.push(table);
    }
    Ok(tables)
}

/// What `stats` reads besides the run.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatsOptions<'a> {
    /// A directory of the user's analytics queries, run after the built-in ones.
    pub analytics: Option<&'a Path>,
    /// Tokenizer for token counts (`cl100k_base`, `o200k_base` or a `tokenizer.json`);
    /// `None` takes the job's, else cl100k_base as a labelled approximation.
    pub tokenizer: Option<&'a str>,
    /// Rows per subset for diversity (default: the smallest subset's size).
    pub sample: Option<u64>,
    /// Human labels of pairs for judge agreement.
    pub labels: Option<&'a Path>,
    /// Seed pairs (the directory `backforth seed` wrote), compared as a subset.
    pub seed: Option<&'a str>,
}

/// The tokenizer token counts use, and how the tables name it: the one asked for, else the
/// job's (recorded in `_job.json`), else cl100k_base, said to be an approximation.
async fn tokenizer(root: &Location, asked: Option<&str>) -> Result<(TokenCounter, String)> {
    if let Some(spec) = asked {
        return Ok((TokenCounter::load(spec, Path::new("."))?, spec.to_string()));
    }
    let job: Option<serde_json::Value> = match root.store.get(&root.path(JOB_FILE)).await {
        Ok(got) => serde_json::from_slice(&got.bytes().await?).ok(),
        Err(_) => None,
    };
    let named = job
        .as_ref()
        .and_then(|j| j.pointer("/prepare/tokenizer"))
        .and_then(|t| t.as_str());
    if let Some(spec) = named
        && let Ok(tokens) = TokenCounter::load(spec, Path::new("."))
    {
        return Ok((tokens, format!("{spec}, the job's tokenizer")));
    }
    let label = match named {
        Some(spec) => format!("cl100k_base, an approximation: the job's {spec} did not load"),
        None => "cl100k_base, an approximation: no tokenizer named (--tokenizer)".to_string(),
    };
    Ok((TokenCounter::load("cl100k_base", Path::new("."))?, label))
}

/// The candidates, every stage with an `instruction` column, and the seed, in that order.
async fn subsets(
    ctx: &datafusion::prelude::SessionContext,
    stages: &[String],
) -> Result<Vec<Subset>> {
    let mut out = Vec::new();
    for stage in stages.iter().filter(|s| *s != "labels") {
        let schema = ctx.table(stage.as_str()).await?.schema().clone();
        let has = |c: &str| schema.has_column_with_unqualified_name(c);
        let instruction = if has("instruction") {
            "instruction"
        } else if stage == "candidates" {
            "CAST(NULL AS VARCHAR)"
        } else {
            continue;
        };
        let response = if has("response") { "response" } else { "text" };
        if has(response) {
            out.push(Subset {
                name: stage.clone(),
                instruction: instruction.into(),
                response: response.into(),
            });
        }
    }
    Ok(out)
}

/// Stages that wrote a `response` beside the web `text` it was made from (the seed has no
/// draft, and the distilled baseline never saw one).
async fn rewrites(
    ctx: &datafusion::prelude::SessionContext,
    stages: &[String],
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for stage in stages
        .iter()
        .filter(|s| !matches!(s.as_str(), "labels" | "seed" | "distilled"))
    {
        let schema = ctx.table(stage.as_str()).await?.schema().clone();
        if schema.has_column_with_unqualified_name("response")
            && schema.has_column_with_unqualified_name("text")
        {
            out.push(stage.clone());
        }
    }
    Ok(out)
}

/// Stages, in `stages`' order, whose dropped rows are a table (`<stage>_dropped`) with the
/// dropped `text`.
async fn dropped(
    ctx: &datafusion::prelude::SessionContext,
    stages: &[String],
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for stage in stages {
        let Ok(table) = ctx.table(format!("{stage}_dropped").as_str()).await else {
            continue;
        };
        if table.schema().has_column_with_unqualified_name("text") {
            out.push(stage.clone());
        }
    }
    Ok(out)
}

/// Human labels of pairs: CSV `id,label` (with a header) or JSON lines `{"id", "label"}`;
/// a label is good/bad as 1/0, true/false, yes/no, keep/drop or good/bad.
fn read_labels(path: &Path) -> Result<RecordBatch> {
    use datafusion::arrow::array::{BooleanArray, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Job(format!("labels {}: {e}", path.display())))?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |message: String| Error::Input {
            file: path.display().to_string(),
            line: i as u64 + 1,
            message,
        };
        if line.trim().is_empty() || (!jsonl && i == 0) {
            continue;
        }
        let (id, label) = if jsonl {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
            let id = v["id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| bad("column 'id' is missing".into()))?;
            (id, v["label"].to_string().trim_matches('"').to_string())
        } else {
            let (id, label) = line
                .rsplit_once(',')
                .ok_or_else(|| bad("expected `id,label`".into()))?;
            (
                id.trim().trim_matches('"').to_string(),
                label.trim().to_string(),
            )
        };
        let good = match label.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "keep" | "good" => true,
            "0" | "false" | "no" | "drop" | "bad" => false,
            other => {
                return Err(bad(format!(
                    "column 'label': '{other}' is not good/bad (1/0, true/false, yes/no, keep/drop)"
                )));
            }
        };
        ids.push(id);
        labels.push(good);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Boolean, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(BooleanArray::from(labels)),
        ],
    )?)
}

async fn funnel(root: &Location, stages: &[String]) -> Result<Table> {
    let mut rows = Vec::new();
    for stage in stages.iter().filter(|s| *s != "labels") {
        let Some(s): Option<StageStats> = read_stage_stats(root, stage).await? else {
            continue;
        };
        let drops: Vec<String> = s.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push(vec![
            stage.clone(),
            s.rows_in.to_string(),
            s.rows_out.to_string(),
            drops.join(" "),
            s.llm.requests.to_string(),
            (s.llm.prompt_tokens + s.llm.completion_tokens).to_string(),
            s.llm.reasoning_tokens.to_string(),
            if s.llm.prompt_tokens == 0 {
                String::new()
            } else {
                format!(
                    "{:.1}%",
                    100.0 * s.llm.cached_tokens as f64 / s.llm.prompt_tokens as f64
                )
            },
            format!("{:.4}", s.llm.cost_usd),
        ]);
    }
    Ok(Table {
        title: "Funnel: rows into and out of every stage, every drop by reason".into(),
        columns: [
            "stage",
            "rows in",
            "rows out",
            "dropped",
            "requests",
            "tokens",
            "reasoning tokens",
            "prompt cached",
            "cost $",
        ]
        .map(String::from)
        .to_vec(),
        rows,
        skipped: None,
    })
}

async fn run_query(
    ctx: &datafusion::prelude::SessionContext,
    name: &str,
    sql: &str,
    stages: &[String],
) -> Result<Table> {
    let title = sql
        .lines()
        .find_map(|l| l.strip_prefix("--").map(str::trim))
        .filter(|l| !l.is_empty())
        .unwrap_or(name)
        .to_string();
    let missing: Vec<&str> = sql
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-- requires:"))
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !stages.iter().any(|s| s == t))
        .collect();
    if !missing.is_empty() {
        return Ok(Table {
            title,
            columns: Vec::new(),
            rows: Vec::new(),
            skipped: Some(if missing == ["labels"] {
                "no labels given (--labels FILE)".to_string()
            } else {
                format!("no complete {} under this root", missing.join(", "))
            }),
        });
    }
    let df = ctx
        .sql(sql)
        .await
        .map_err(|e| Error::Job(format!("analytics query {name}: {e}")))?;
    let columns = df
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let batches: Vec<RecordBatch> = df.collect().await?;
    let mut rows = Vec::new();
    for batch in &batches {
        for r in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(r) {
                            Ok(String::new())
                        } else {
                            array_value_to_string(c, r)
                        }
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            );
        }
    }
    Ok(Table {
        title,
        columns,
        rows,
        skipped: None,
    })
}

/// Renders tables for the terminal: a title line and aligned columns.
pub fn render_text(tables: &[Table]) -> String {
    let mut out = String::new();
    for t in tables {
        out.push_str(&format!("\n{}\n", t.title));
        if let Some(why) = &t.skipped {
            out.push_str(&format!("  (skipped: {why})\n"));
            continue;
        }
        let widths: Vec<usize> = (0..t.columns.len())
            .map(|i| {
                t.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([t.columns[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| -> String {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            format!("  {}\n", padded.join("  ").trim_end())
        };
        out.push_str(&line(&t.columns));
        for row in &t.rows {
            out.push_str(&line(row));
        }
    }
    out
}

/// Renders tables as CSV, one block per table headed by its title as a comment.
pub fn render_csv(tables: &[Table]) -> String {
    let quote = |c: &str| {
        if c.contains([',', '"', '\n']) {
            format!("\"{}\"", c.replace('"', "\"\""))
        } else {
            c.to_string()
        }
    };
    let mut out = String::new();
    for t in tables.iter().filter(|t| t.skipped.is_none()) {
        out.push_str(&format!("# {}\n", t.title));
        out.push_str(
            &t.columns
                .iter()
                .map(|c| quote(c))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
        for row in &t.rows {
            out.push_str(&row.iter().map(|c| quote(c)).collect::<Vec<_>>().join(","));
            out.push('\n');
        }
        out.push('\n');
    }
    out
}
