//! `backforth report`: one self-contained HTML file (no network fetches) with the tables of
//! `stats`, plots drawn as inline SVG, and a sample of pairs per score level for reading.
//! Everything that comes from the data is HTML-escaped.

use std::fmt::Write as _;
use std::path::Path;

use datafusion::arrow::util::display::array_value_to_string;

use crate::error::{Error, Result};
use crate::pipeline;
use crate::stats::{self, Table};
use crate::storage::Location;

/// Pairs shown per score level.
const SAMPLES_PER_SCORE: usize = 2;

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Builds the report of the run under `root`.
pub async fn report(root: &str, tokenizer: &str, labels: Option<&Path>) -> Result<String> {
    let tables = stats::stats(root, None, tokenizer, None, labels).await?;
    let samples = sample_pairs(root).await?;
    let mut html = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>backforth report</title><style>\
         body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
         table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}\
         th{background:#f3f3f3}svg{margin:.5em 0 1.5em}.bar{fill:#4a7ab8}.label{font-size:11px}\
         .pair{border:1px solid #ddd;padding:.5em;margin:.5em 0;white-space:pre-wrap;font-size:13px}\
         </style></head><body>\n",
    );
    let _ = writeln!(html, "<h1>backforth report</h1><p>{}</p>", escape(root));
    for table in &tables {
        html.push_str(&html_table(table, plot_for(table)));
    }
    html.push_str("<h2>Pairs by score</h2>\n");
    for (score, pairs) in &samples {
        let _ = writeln!(html, "<h3>score {}</h3>", escape(score));
        for (instruction, response) in pairs {
            let _ = writeln!(
                html,
                "<div class=\"pair\"><b>Instruction</b>\n{}\n\n<b>Response</b>\n{}</div>",
                escape(instruction),
                escape(response)
            );
        }
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

fn html_table(table: &Table, plot: Option<String>) -> String {
    let mut out = format!("<h2>{}</h2>\n", escape(&table.title));
    out.push_str(&plot.unwrap_or_default());
    if let Some(why) = &table.skipped {
        let _ = writeln!(out, "<p><i>skipped: {}</i></p>", escape(why));
        return out;
    }
    out.push_str("<table><tr>");
    for c in &table.columns {
        let _ = write!(out, "<th>{}</th>", escape(c));
    }
    out.push_str("</tr>\n");
    for row in &table.rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{}</td>", escape(cell));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    out
}

/// The bar chart drawn above a table: (label column, value column) per known table.
fn plot_for(table: &Table) -> Option<String> {
    if table.skipped.is_some() || table.rows.is_empty() {
        return None;
    }
    let (label, value, caption) = match table.title.split(':').next()? {
        t if t.starts_with("Score histogram") => (0, 1, "pairs per score"),
        t if t.starts_with("Yield per threshold") => (0, 1, "pairs kept per threshold"),
        t if t.starts_with("Lengths per subset") => (0, 8, "mean response tokens per subset"),
        t if t.starts_with("Diversity") => (0, 3, "unique response trigrams per subset"),
        _ => return None,
    };
    let bars: Vec<(String, f64)> = table
        .rows
        .iter()
        .map(|r| (r[label].clone(), r[value].parse::<f64>().unwrap_or(0.0)))
        .collect();
    Some(bar_chart(caption, &bars))
}

/// A horizontal bar chart as inline SVG; each bar is a `rect.bar`.
pub fn bar_chart(caption: &str, bars: &[(String, f64)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let (row, label_w, plot_w) = (22.0, 170.0, 600.0);
    let height = 30.0 + row * bars.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"plot\" width=\"{}\" height=\"{height}\" role=\"img\" aria-label=\"{}\">\
         <text x=\"0\" y=\"14\" font-size=\"13\">{}</text>",
        label_w + plot_w + 80.0,
        escape(caption),
        escape(caption)
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 24.0 + row * i as f64;
        let w = (value / max * plot_w).max(1.0);
        let _ = write!(
            svg,
            "<text class=\"label\" x=\"0\" y=\"{:.1}\">{}</text>\
             <rect class=\"bar\" x=\"{label_w}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\"><title>{}: {}</title></rect>\
             <text class=\"label\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            y + 13.0,
            escape(label),
            row - 6.0,
            escape(label),
            value,
            label_w + w + 4.0,
            y + 13.0,
            value
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Up to [`SAMPLES_PER_SCORE`] pairs per score level, from `rewritten` when it exists (the
/// final answers) and otherwise from `scored`.
async fn sample_pairs(root: &str) -> Result<Vec<(String, Vec<(String, String)>)>> {
    let location = Location::parse(root)?;
    let (ctx, stages) = pipeline::open_root(&location).await?;
    if !stages.iter().any(|s| s == "scored") {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT COALESCE(CAST(score AS VARCHAR), 'none') AS score, instruction, text FROM \
         (SELECT *, row_number() OVER (PARTITION BY score ORDER BY id) AS n FROM scored) \
         WHERE n <= {SAMPLES_PER_SCORE} ORDER BY score DESC, id"
    );
    let batches = ctx.sql(&sql).await?.collect().await?;
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for batch in &batches {
        for r in 0..batch.num_rows() {
            let cell = |c: usize| -> Result<String> {
                let col = batch.column(c);
                if col.is_null(r) {
                    return Ok(String::new());
                }
                array_value_to_string(col, r).map_err(|e| Error::Execution(e.to_string()))
            };
            let score = cell(0)?;
            let pair = (cell(1)?, cell(2)?);
            match out.last_mut() {
                Some((s, pairs)) if *s == score => pairs.push(pair),
                _ => out.push((score, vec![pair])),
            }
        }
    }
    Ok(out)
}
