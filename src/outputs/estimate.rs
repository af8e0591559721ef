//! `backforth estimate`: requests, tokens and cost per stage before anything is paid.
//!
//! The input stage runs for real (it calls no LLM), so candidate counts are exact. Prompts
//! are rendered with the job's templates for a sample of candidates and counted with the
//! job's tokenizer. What is not known before the LLM answers is taken from the papers and can
//! be set in `[params]`: instruction length `estimate_instruction_tokens` (69, BaF Table 6),
//! judgement length `estimate_judgement_tokens` (120), the share `curated` keeps
//! `estimate_keep_rate` (0.136 at threshold 5, BaF; 0.388 at 4, Humpback), rewrites 0.94 and
//! distilled answers 1.14 times the web text's length (BaF: 468 and 567 vs 499 tokens).
//! A role that thinks (`thinking = true`, or a `reasoning_effort` other than `none`) spends
//! `estimate_reasoning_tokens` per call before its answer (default 1,000: no paper gives a
//! figure; a pilot run's `stats` funnel shows the real one), within its `thinking_budget` and
//! the call's `max_tokens`.
//! A function with `n` samples pays its completions `n` times, and its prompts once per
//! request; a stage that unnests them has a row per sample.

use std::collections::BTreeMap;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;

use crate::engine::session::{new_session, register_store};
use crate::engine::window::Window;
use crate::error::{Error, Result};
use crate::job::catalog::{DOCUMENTS, ExpectedOutput, INSTRUCTION_TOKENS};
use crate::job::template::render_sql;
use crate::job::{FunctionSpec, Job};
use crate::prepare::tokens::TokenCounter;
use crate::root::marker::read_stage_stats;
use crate::root::tables::register_complete_stages;
use crate::run::plan::referenced_tables;
use crate::run::{RunOptions, run};
use crate::storage::Location;

/// The estimate for one stage.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StageEstimate {
    /// Stage name.
    pub stage: String,
    /// Rows expected into the stage.
    pub rows: f64,
    /// LLM requests expected.
    pub requests: f64,
    /// Prompt tokens: templates rendered and counted on a sample.
    pub prompt_tokens: f64,
    /// Completion tokens expected, thinking included.
    pub completion_tokens: f64,
    /// Of the completion tokens, those spent thinking.
    pub reasoning_tokens: f64,
    /// Completion tokens at most (every reply at `max_tokens`).
    pub completion_tokens_max: f64,
    /// Cost at the models' prices, in US dollars (expected completion lengths).
    pub cost_usd: f64,
}

fn param(job: &Job, name: &str, default: f64) -> f64 {
    job.params
        .get(name)
        .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
        .unwrap_or(default)
}

/// The output tokens `expected` stands for, for a text of `text_tokens`.
fn expected_tokens(job: &Job, expected: ExpectedOutput, text_tokens: f64) -> f64 {
    match expected {
        ExpectedOutput::Tokens {
            param: name,
            default,
        } => param(job, name, default),
        ExpectedOutput::TimesText(times) => times * text_tokens,
    }
}

/// Estimates every LLM stage of `job`; runs the input stage first if it is not complete.
pub async fn estimate(job: &Job, sample: usize) -> Result<Vec<StageEstimate>> {
    let ctx = new_session(None, Window::for_cap(1))?;
    let mut input_stages = Vec::new();
    for stage in &job.stages {
        let sql = render_sql(job, stage)?;
        if referenced_tables(&ctx, &sql, &stage.name)?
            .iter()
            .any(|t| t == DOCUMENTS)
        {
            input_stages.push(stage.name.clone());
        }
    }
    run(
        job,
        &RunOptions {
            stages: input_stages.clone(),
            ..RunOptions::default()
        },
    )
    .await?;
    let root = Location::parse(&job.output)?;
    register_store(&ctx, &root);
    register_complete_stages(&ctx, &root, input_stages.clone()).await?;
    let tokens = TokenCounter::load(&job.prepare.tokenizer, &job.base_dir)?;
    let Some(first) = input_stages.first() else {
        return Err(Error::Job("the job has no stage reading the input".into()));
    };
    let texts = sample_texts(&ctx, first, sample).await?;
    let text_tokens =
        texts.iter().map(|t| tokens.count(t) as f64).sum::<f64>() / texts.len().max(1) as f64;
    let instruction_tokens = expected_tokens(job, INSTRUCTION_TOKENS, 0.0);
    let instruction = "word ".repeat(instruction_tokens as usize);
    let keep_rate = param(
        job,
        "estimate_keep_rate",
        match job.threshold {
            5 => 0.136,
            4 => 0.388,
            _ => 0.75,
        },
    );
    let mut rows: BTreeMap<String, f64> = BTreeMap::new();
    let stats = read_stage_stats(&root, first).await?;
    rows.insert(first.clone(), stats.map_or(0.0, |s| s.rows_out as f64));
    let mut out = Vec::new();
    let mut samples_of: BTreeMap<String, f64> = BTreeMap::new();
    for stage in job
        .stages
        .iter()
        .filter(|s| !input_stages.contains(&s.name))
    {
        let sql = render_sql(job, stage)?;
        let upstream = stage.from.clone().or_else(|| {
            job.stages
                .iter()
                .take_while(|s| s.name != stage.name)
                .filter(|s| sql.contains(s.name.as_str()))
                .last()
                .map(|s| s.name.clone())
        });
        let mut rows_in = upstream
            .as_ref()
            .and_then(|u| rows.get(u).copied())
            .unwrap_or(0.0);
        // A stage unnesting the samples of the one it reads has a row per sample.
        if sql.contains("unnest(")
            && let Some(k) = upstream.as_ref().and_then(|u| samples_of.get(u))
        {
            rows_in *= k;
        }
        // Only the score threshold's keep rate is known (from the paper); other filters are
        // taken to keep everything, so the estimate errs high.
        let rows_out = if stage.name == "curated" {
            rows_in * keep_rate
        } else {
            rows_in
        };
        rows.insert(stage.name.clone(), rows_out);
        let mut est = StageEstimate {
            stage: stage.name.clone(),
            rows: rows_in,
            ..StageEstimate::default()
        };
        let functions = job.functions_in(&sql);
        if let Some(k) = functions.iter().map(|f| f.samples).max()
            && k > 1
        {
            samples_of.insert(stage.name.clone(), f64::from(k));
        }
        for f in functions {
            let prompt = mean_prompt_tokens(f, &texts, &instruction, &tokens)?;
            let expected_out = match f.expected_output {
                // The score is the first token.
                _ if f.logprobs => 1.0,
                Some(expected) => expected_tokens(job, expected, text_tokens),
                // A function of the job's own: as long as an answer.
                None => 1.14 * text_tokens,
            }
            .min(f.max_tokens as f64);
            let model = &job.models[&f.role];
            let budget = model
                .extra
                .get("thinking_token_budget")
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::MAX);
            let thinking = if thinks(model) {
                param(job, "estimate_reasoning_tokens", 1000.0)
                    .min(budget)
                    .min(f.max_tokens as f64 - expected_out)
                    .max(0.0)
            } else {
                0.0
            };
            let samples = f64::from(f.samples.max(1));
            let requests = if model.supports_n { 1.0 } else { samples };
            let completion = samples * (expected_out + thinking);
            est.requests += rows_in * requests;
            est.prompt_tokens += rows_in * requests * prompt;
            est.completion_tokens += rows_in * completion;
            est.reasoning_tokens += rows_in * samples * thinking;
            est.completion_tokens_max += rows_in * samples * f.max_tokens as f64;
            est.cost_usd += rows_in
                * (requests * prompt * model.price_input_per_mtok
                    + completion * model.price_output_per_mtok)
                / 1e6;
        }
        if est.requests > 0.0 {
            out.push(est);
        }
    }
    Ok(out)
}

/// Whether calls to `model` think before answering, by what the job asks of it.
fn thinks(model: &crate::job::ModelSpec) -> bool {
    let effort = model.extra.get("reasoning_effort").and_then(|v| v.as_str());
    let enabled = model
        .extra
        .get("chat_template_kwargs")
        .and_then(|k| k.get("enable_thinking"))
        .and_then(|v| v.as_bool());
    enabled == Some(true) || effort.is_some_and(|e| e != "none")
}

async fn sample_texts(
    ctx: &datafusion::prelude::SessionContext,
    stage: &str,
    sample: usize,
) -> Result<Vec<String>> {
    let sql = format!(
        "SELECT text FROM {stage} ORDER BY id LIMIT {}",
        sample.max(1)
    );
    let batches = ctx.sql(&sql).await?.collect().await?;
    let mut texts = Vec::new();
    for batch in batches {
        let column = cast(batch.column(0), &DataType::Utf8)?;
        texts.extend(
            column
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(str::to_string),
        );
    }
    Ok(texts)
}

/// Mean prompt tokens of `f` over the sample: the web text where the function takes it, a
/// stand-in of the expected length for the instruction it cannot know yet.
fn mean_prompt_tokens(
    f: &FunctionSpec,
    texts: &[String],
    instruction: &str,
    tokens: &TokenCounter,
) -> Result<f64> {
    let mut env = minijinja::Environment::new();
    env.add_template_owned("prompt", f.template.clone())
        .map_err(|e| Error::Job(format!("template of {}: {e}", f.name)))?;
    let template = env
        .get_template("prompt")
        .map_err(|e| Error::Internal(e.to_string()))?;
    let mut total = 0.0;
    for text in texts {
        let rendered = template
            .render(minijinja::context! {
                text => text, response => text, draft => text, instruction => instruction,
            })
            .map_err(|e| Error::Job(format!("template of {}: {e}", f.name)))?;
        let system = f.system.as_deref().map_or(0, |s| tokens.count(s));
        total += (tokens.count(&rendered) + system) as f64;
    }
    Ok(total / texts.len().max(1) as f64)
}
