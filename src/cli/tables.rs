//! What the commands print: query results, the estimate and the end-of-run funnel.

use std::path::Path;

use crate::engine::session::scalar_udfs;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;

use crate::error::{Context, Result};
use crate::job::Job;
use crate::outputs::estimate::StageEstimate;
use crate::prepare::tokens::TokenCounter;
use crate::root::tables::open_root;
use crate::run::RunSummary;
use crate::storage::Location;

/// Runs `query` over the complete stages under `root` and renders the result as a table.
pub async fn sql(root: &str, query: &str) -> Result<String> {
    let root = Location::parse(root)?;
    let (ctx, _) = open_root(&root).await?;
    let tokens = TokenCounter::load("cl100k_base", Path::new("."))?;
    for udf in scalar_udfs(tokens, Default::default()) {
        ctx.register_udf(udf);
    }
    let batches: Vec<RecordBatch> = ctx.sql(query).await?.collect().await?;
    let table =
        pretty_format_batches(&batches).with_context(|| "formatting the result".to_string())?;
    Ok(format!("{table}\n"))
}

/// The estimate as a table, with a total row.
pub fn render_estimate(stages: &[StageEstimate]) -> String {
    let mut out = format!(
        "{:<16} {:>10} {:>10} {:>14} {:>18} {:>12} {:>18} {:>10}\n",
        "stage",
        "rows",
        "requests",
        "prompt tokens",
        "completion tokens",
        "(thinking)",
        "(at most)",
        "cost $"
    );
    let mut total = StageEstimate::default();
    for s in stages {
        out.push_str(&format!(
            "{:<16} {:>10.0} {:>10.0} {:>14.0} {:>18.0} {:>12.0} {:>18.0} {:>10.2}\n",
            s.stage,
            s.rows,
            s.requests,
            s.prompt_tokens,
            s.completion_tokens,
            s.reasoning_tokens,
            s.completion_tokens_max,
            s.cost_usd
        ));
        total.requests += s.requests;
        total.prompt_tokens += s.prompt_tokens;
        total.completion_tokens += s.completion_tokens;
        total.reasoning_tokens += s.reasoning_tokens;
        total.completion_tokens_max += s.completion_tokens_max;
        total.cost_usd += s.cost_usd;
    }
    out.push_str(&format!(
        "{:<16} {:>10} {:>10.0} {:>14.0} {:>18.0} {:>12.0} {:>18.0} {:>10.2}\n",
        "total",
        "",
        total.requests,
        total.prompt_tokens,
        total.completion_tokens,
        total.reasoning_tokens,
        total.completion_tokens_max,
        total.cost_usd
    ));
    out
}

/// The end-of-run table: rows in and out, drops by reason, requests and tokens per stage.
pub fn render_summary(job: &Job, summary: &RunSummary) -> String {
    let mut out = format!("\njob '{}' -> {}\n", job.name, job.output);
    out.push_str(&format!(
        "{:<16} {:>9} {:>9} {:>9} {:>11} {:>9} {:>8}  dropped\n",
        "stage", "rows in", "rows out", "requests", "tokens", "cost $", "seconds"
    ));
    for s in &summary.stages {
        let dropped: Vec<String> = s.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "{:<16} {:>9} {:>9} {:>9} {:>11} {:>9.4} {:>8.1}  {}\n",
            s.stage,
            s.rows_in,
            s.rows_out,
            s.llm.requests,
            s.llm.prompt_tokens + s.llm.completion_tokens,
            s.llm.cost_usd,
            s.seconds,
            dropped.join(" ")
        ));
        if let Some(input) = &s.input {
            let skipped: Vec<String> = input
                .skipped
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            out.push_str(&format!(
                "{:<16} {:>9} documents read{}\n",
                "",
                input.documents,
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(", skipped {}", skipped.join(" "))
                }
            ));
        }
    }
    out
}
