//! `backforth report`: one self-contained HTML file (no network fetches) with the tables of
//! `stats`, plots drawn as inline SVG, and a sample of pairs per score level for reading.
//! Everything that comes from the data is HTML-escaped. The same SVG plots can be rendered to
//! PNG for papers and slides.

use std::fmt::Write as _;
use std::path::Path;

use datafusion::arrow::util::display::array_value_to_string;

use crate::error::{Context, Error, Result};
use crate::outputs::stats::{self, StatsOptions, Table};
use crate::root::tables::open_root;
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

/// One plot of the report: a file-name stem and the SVG.
#[derive(Debug, Clone)]
pub struct Plot {
    /// Stem of the PNG file (`score_histogram_it0_m0`).
    pub name: String,
    /// The standalone SVG document.
    pub svg: String,
}

/// A built report.
#[derive(Debug, Clone)]
pub struct Report {
    /// The HTML page.
    pub html: String,
    /// Its plots, in page order.
    pub plots: Vec<Plot>,
}

/// Builds the report of the run under `root`.
pub async fn report(root: &str, opts: &StatsOptions<'_>) -> Result<Report> {
    let tables = stats::stats(root, opts).await?;
    let samples = sample_pairs(root).await?;
    let mut plots = Vec::new();
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
        let table_plots = plots_for(table);
        let svgs: String = table_plots.iter().map(|p| p.svg.as_str()).collect();
        html.push_str(&html_table(table, svgs));
        plots.extend(table_plots);
    }
    html.push_str("<h2>Pairs by score</h2>\n");
    for (score, pairs) in &samples {
        let _ = writeln!(html, "<h3>score {}</h3>", escape(score));
        for pair in pairs {
            let _ = match &pair.original {
                Some(original) => writeln!(
                    html,
                    "<div class=\"pair\"><b>Instruction</b>\n{}\n\n<b>Response</b>\n{}\n\n<b>Original text</b>\n{}</div>",
                    escape(&pair.instruction),
                    escape(&pair.response),
                    escape(original)
                ),
                None => writeln!(
                    html,
                    "<div class=\"pair\"><b>Instruction</b>\n{}\n\n<b>Web text</b> (not rewritten)\n{}</div>",
                    escape(&pair.instruction),
                    escape(&pair.response)
                ),
            };
        }
    }
    html.push_str("</body></html>\n");
    Ok(Report { html, plots })
}

/// Renders each plot to `<dir>/<name>.png` at twice its size, with the system's fonts;
/// returns the files written.
pub fn write_pngs(plots: &[Plot], dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    use resvg::{tiny_skia, usvg};
    let mut options = usvg::Options::default();
    options.fontdb_mut().load_system_fonts();
    if options.fontdb.is_empty() {
        return Err(Error::Execution(
            "report --png: no fonts found in the system's font directories; install one \
             (Debian: apt-get install fonts-dejavu-core)"
                .into(),
        ));
    }
    // The generic `sans-serif` maps to Arial unless told otherwise; use a sans face present.
    let families: Vec<String> = options
        .fontdb
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .collect();
    let sans = [
        "DejaVu Sans",
        "Liberation Sans",
        "Noto Sans",
        "Arial",
        "Helvetica",
    ]
    .iter()
    .find(|want| families.iter().any(|f| f == *want))
    .map(|f| f.to_string())
    .unwrap_or_else(|| families[0].clone());
    options.fontdb_mut().set_sans_serif_family(sans);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for plot in plots {
        let tree = usvg::Tree::from_str(&plot.svg, &options)
            .map_err(|e| Error::Internal(format!("plot {} is not valid SVG: {e}", plot.name)))?;
        let size = tree
            .size()
            .to_int_size()
            .scale_by(2.0)
            .ok_or_else(|| Error::Internal(format!("plot {} has no size", plot.name)))?;
        let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
            .ok_or_else(|| Error::Internal(format!("plot {} is empty", plot.name)))?;
        pixmap.fill(tiny_skia::Color::WHITE);
        resvg::render(
            &tree,
            tiny_skia::Transform::from_scale(2.0, 2.0),
            &mut pixmap.as_mut(),
        );
        let path = dir.join(format!("{}.png", plot.name));
        pixmap
            .save_png(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn html_table(table: &Table, plots: String) -> String {
    let mut out = format!("<h2>{}</h2>\n", escape(&table.title));
    out.push_str(&plots);
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

/// The plots drawn above a table, by the table's title.
fn plots_for(table: &Table) -> Vec<Plot> {
    if table.skipped.is_some() || table.rows.is_empty() {
        return Vec::new();
    }
    let kind = |prefix: &str| table.title.starts_with(prefix);
    let column = |name: &str| table.columns.iter().position(|c| c == name);
    let bars = |label: usize, value: usize, rows: &[&Vec<String>]| -> Vec<(String, f64)> {
        rows.iter()
            .map(|r| (r[label].clone(), r[value].parse::<f64>().unwrap_or(0.0)))
            .collect()
    };
    let all: Vec<&Vec<String>> = table.rows.iter().collect();
    let single = |name: &str, caption: &str, label: &str, value: &str| -> Vec<Plot> {
        match (column(label), column(value)) {
            (Some(l), Some(v)) => vec![Plot {
                name: name.to_string(),
                svg: bar_chart(caption, &bars(l, v, &all)),
            }],
            _ => Vec::new(),
        }
    };
    match () {
        _ if kind("Score histogram") => {
            let (Some(it), Some(model), Some(score), Some(pairs)) = (
                column("iteration"),
                column("model"),
                column("score"),
                column("pairs"),
            ) else {
                return Vec::new();
            };
            // One histogram per scoring iteration and model, in the table's order.
            let mut groups: Vec<((String, String), Vec<&Vec<String>>)> = Vec::new();
            for row in &table.rows {
                let key = (row[it].clone(), row[model].clone());
                match groups.last_mut() {
                    Some((k, rows)) if *k == key => rows.push(row),
                    _ => groups.push((key, vec![row])),
                }
            }
            groups
                .into_iter()
                .map(|((it, model), rows)| Plot {
                    name: format!("score_histogram_it{it}_{}", file_safe(&model)),
                    svg: bar_chart(
                        &format!("pairs per score, iteration {it}, {model}"),
                        &bars(score, pairs, &rows),
                    ),
                })
                .collect()
        }
        _ if kind("Score transitions") => vec![Plot {
            name: "score_transitions".into(),
            svg: heatmap(
                "iteration 0 score (rows) to iteration 1 score (columns)",
                table,
            ),
        }],
        _ if kind("Yield per threshold") => {
            let (Some(threshold), Some(kept)) = (column("threshold"), column("kept")) else {
                return Vec::new();
            };
            let label = |r: &Vec<String>| match column("iteration") {
                Some(it) => format!("iteration {}: {}", r[it], r[threshold]),
                None => r[threshold].clone(),
            };
            let bars: Vec<(String, f64)> = table
                .rows
                .iter()
                .map(|r| (label(r), r[kept].parse::<f64>().unwrap_or(0.0)))
                .collect();
            vec![Plot {
                name: "yield".into(),
                svg: bar_chart("pairs kept per threshold", &bars),
            }]
        }
        _ if kind("Lengths per subset") => single(
            "lengths",
            "mean response tokens per subset",
            "subset",
            "response_tokens",
        ),
        _ if kind("Diversity") => single(
            "diversity",
            "unique response trigrams per subset",
            "subset",
            "response_trigrams",
        ),
        _ => Vec::new(),
    }
}

fn file_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The transition table as a grid of cells shaded by count; each cell is a `rect.cell`.
fn heatmap(caption: &str, table: &Table) -> String {
    let targets: Vec<usize> = (0..table.columns.len())
        .filter(|&i| table.columns[i].starts_with("to_"))
        .collect();
    let value = |r: &Vec<String>, c: usize| r[c].parse::<f64>().unwrap_or(0.0);
    let max = table
        .rows
        .iter()
        .flat_map(|r| targets.iter().map(move |&c| value(r, c)))
        .fold(0.0, f64::max)
        .max(1.0);
    let (cell, left, top) = (44.0, 60.0, 40.0);
    let width = (left + cell * targets.len() as f64 + 10.0).max(7.5 * caption.len() as f64);
    let height = top + cell * table.rows.len() as f64 + 10.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"plot\" width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"{0}\">\
         <text x=\"0\" y=\"14\" font-size=\"13\" font-family=\"sans-serif\">{0}</text>",
        escape(caption)
    );
    for (j, &c) in targets.iter().enumerate() {
        let _ = write!(
            svg,
            "<text class=\"label\" font-size=\"11\" font-family=\"sans-serif\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            left + cell * j as f64 + 8.0,
            top - 6.0,
            escape(&table.columns[c])
        );
    }
    for (i, row) in table.rows.iter().enumerate() {
        let y = top + cell * i as f64;
        let _ = write!(
            svg,
            "<text class=\"label\" font-size=\"11\" font-family=\"sans-serif\" x=\"0\" y=\"{:.1}\">from {}</text>",
            y + cell / 2.0 + 4.0,
            escape(&row[0])
        );
        for (j, &c) in targets.iter().enumerate() {
            let v = value(row, c);
            // Light for few pairs, dark blue for the most; the count is written in the cell.
            let shade = 245.0 - 175.0 * v / max;
            let x = left + cell * j as f64;
            let _ = write!(
                svg,
                "<rect class=\"cell\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{size:.1}\" height=\"{size:.1}\" fill=\"rgb({shade:.0},{shade:.0},245)\"><title>{from} {to}: {v}</title></rect>\
                 <text font-size=\"11\" font-family=\"sans-serif\" fill=\"{ink}\" x=\"{tx:.1}\" y=\"{ty:.1}\">{v}</text>",
                ink = if shade < 150.0 { "white" } else { "black" },
                size = cell - 2.0,
                from = escape(&row[0]),
                to = escape(&table.columns[c]),
                tx = x + 6.0,
                ty = y + cell / 2.0 + 4.0,
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// A horizontal bar chart as inline SVG; each bar is a `rect.bar`.
pub fn bar_chart(caption: &str, bars: &[(String, f64)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let (row, label_w, plot_w) = (22.0, 170.0, 600.0);
    let height = 30.0 + row * bars.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"plot\" width=\"{}\" height=\"{height}\" role=\"img\" aria-label=\"{}\">\
         <text x=\"0\" y=\"14\" font-size=\"13\" font-family=\"sans-serif\">{}</text>",
        label_w + plot_w + 80.0,
        escape(caption),
        escape(caption)
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 24.0 + row * i as f64;
        let w = (value / max * plot_w).max(1.0);
        let _ = write!(
            svg,
            "<text class=\"label\" font-size=\"11\" font-family=\"sans-serif\" x=\"0\" y=\"{:.1}\">{}</text>\
             <rect class=\"bar\" fill=\"#4a7ab8\" x=\"{label_w}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\"><title>{}: {}</title></rect>\
             <text class=\"label\" font-size=\"11\" font-family=\"sans-serif\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
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

/// A pair shown in the report.
struct Sample {
    instruction: String,
    /// The rewritten answer, or the web text where nothing was rewritten.
    response: String,
    /// The web text the answer was rewritten from.
    original: Option<String>,
}

/// Up to [`SAMPLES_PER_SCORE`] pairs per score level: from `rewritten` when it exists (the
/// final answers, with the web text they came from beside them), otherwise from `scored`
/// (the web text, as scored).
async fn sample_pairs(root: &str) -> Result<Vec<(String, Vec<Sample>)>> {
    let location = Location::parse(root)?;
    let (ctx, stages) = open_root(&location).await?;
    let rewritten = stages.iter().any(|s| s == "rewritten");
    let (table, response, original) = if rewritten {
        ("rewritten", "response", "text")
    } else if stages.iter().any(|s| s == "scored") {
        ("scored", "text", "NULL")
    } else {
        return Ok(Vec::new());
    };
    // A table of its own making may lack the score: its pairs are one level, `none`.
    let has_score = ctx
        .table(table)
        .await?
        .schema()
        .has_column_with_unqualified_name("score");
    let (score, no_score) = match has_score {
        true => ("score", ""),
        false => ("CAST(NULL AS BIGINT)", ", CAST(NULL AS BIGINT) AS score"),
    };
    let sql = format!(
        "SELECT COALESCE(CAST(score AS VARCHAR), 'none') AS score, instruction, {response}, \
                CAST({original} AS VARCHAR) FROM \
         (SELECT *{no_score}, row_number() OVER (PARTITION BY {score} ORDER BY id) AS n \
          FROM {table}) \
         WHERE n <= {SAMPLES_PER_SCORE} ORDER BY score DESC, id"
    );
    let batches = ctx.sql(&sql).await?.collect().await?;
    let mut out: Vec<(String, Vec<Sample>)> = Vec::new();
    for batch in &batches {
        for r in 0..batch.num_rows() {
            let cell = |c: usize| -> Result<Option<String>> {
                let col = batch.column(c);
                if col.is_null(r) {
                    return Ok(None);
                }
                let value =
                    array_value_to_string(col, r).map_err(|e| Error::Execution(e.to_string()))?;
                Ok(Some(value))
            };
            let score = cell(0)?.unwrap_or_default();
            let sample = Sample {
                instruction: cell(1)?.unwrap_or_default(),
                response: cell(2)?.unwrap_or_default(),
                original: if rewritten {
                    Some(cell(3)?.unwrap_or_default())
                } else {
                    None
                },
            };
            match out.last_mut() {
                Some((s, pairs)) if *s == score => pairs.push(sample),
                _ => out.push((score, vec![sample])),
            }
        }
    }
    Ok(out)
}
