//! Command-line interface: argument definitions (`args`), dispatch to the library (here),
//! and what the commands print (`tables`).

mod args;
mod tables;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::args::{BatchAction, Cli, Command};
use crate::cli::tables::{render_estimate, render_summary, sql};
use crate::error::{Context, Error, Result};
use crate::escape::escape_control;
use crate::job::Job;
use crate::job_error;
use crate::outputs::export::{self, ExportOptions, Format};
use crate::outputs::report::{report, write_pngs};
use crate::outputs::seed::{problem_summary, seed};
use crate::outputs::stats::{StatsOptions, render_csv, render_text, stats};
use crate::prepare::ingest::DECODERS_AT_ONCE;
use crate::run::batch::{capture_stage_requests, import_batch_results, result_lines};
use crate::run::worker::Worker;
use crate::run::{RunOptions, run};
use crate::storage::Location;

/// Threads for blocking work: file I/O on local disk (every object store call and journal
/// append is one) and input decoding (at most [`DECODERS_AT_ONCE`], half of these). Tokio's
/// default, 512, let a run of many shards grow to a hundred threads, each keeping allocator
/// memory of its own: peak RSS went with the number of shards under way, not the slots.
const BLOCKING_THREADS: usize = 2 * DECODERS_AT_ONCE;

/// How long an idle blocking thread waits for work before it ends (tokio's default is 10 s).
/// An idle thread keeps what the allocator caches for it until it ends; with tokio's default
/// (and mimalloc, the allocator then) resident memory crept up by 18 MiB over the 70 s of the
/// job bench's 10x memory row.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(500);

/// Entry point of the binary: parse, run, print errors, map to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", escape_control(&e.to_string()));
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKFORTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run {
            job,
            stages,
            worker,
            workers,
            allow_changes,
            trust_single_writer,
        } => {
            let worker = Worker::detect(worker.as_deref(), workers, |k| std::env::var(k).ok())?;
            let opts = RunOptions {
                stages,
                worker,
                allow_changes,
                trust_single_writer,
            };
            run_job(job.load()?, opts).await
        }
        Command::Batch { action } => batch(action).await,
        Command::Estimate { job, sample, json } => estimate(job.load()?, sample, json).await,
        Command::Stats {
            root,
            format,
            analytics,
            tokenizer,
            sample,
            labels,
            seed,
        } => {
            let opts = StatsOptions {
                analytics: analytics.as_deref(),
                tokenizer: tokenizer.as_deref(),
                sample,
                labels: labels.as_deref(),
                seed: seed.as_deref(),
            };
            print_stats(&root, &opts, &format).await
        }
        Command::Report {
            root,
            out,
            tokenizer,
            labels,
            seed,
            png,
        } => {
            let opts = StatsOptions {
                tokenizer: tokenizer.as_deref(),
                labels: labels.as_deref(),
                seed: seed.as_deref(),
                ..Default::default()
            };
            write_report(&root, &opts, &out, png.as_deref()).await
        }
        Command::Sql { root, query } => {
            print!("{}", escape_control(&sql(&root, &query).await?));
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            root,
            format,
            output,
            table,
            tag,
            tag_text,
            seed,
            seed_tag_text,
            size,
            sample_seed,
            no_card,
            test_fraction,
            license,
        } => {
            let opts = ExportOptions {
                root,
                table,
                format,
                output,
                tag,
                tag_text,
                seed,
                seed_tag_text,
                size,
                sample_seed,
                card: !no_card,
                test_fraction,
                license,
            };
            export_pairs(&opts).await
        }
        Command::Seed {
            input,
            output,
            count,
            format,
        } => select_seed(&input, &output, count, format).await,
    }
}

async fn run_job(job: Job, opts: RunOptions) -> Result<ExitCode> {
    let summary = run(&job, &opts).await?;
    eprint!("{}", render_summary(&job, &summary));
    let failures = summary.llm_failures();
    if failures > 0 {
        eprintln!(
            "{failures} row(s) lost their LLM call after every retry: they are in <stage>/_dropped/ with reason llm_error, or kept with the error in their call (score_reason = 'llm_error'); a rerun retries them"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn estimate(job: Job, sample: usize, json: bool) -> Result<ExitCode> {
    let stages = crate::outputs::estimate::estimate(&job, sample).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&stages).map_err(|e| Error::Internal(e.to_string()))?
        );
    } else {
        print!("{}", render_estimate(&stages));
    }
    Ok(ExitCode::SUCCESS)
}

async fn print_stats(root: &str, opts: &StatsOptions<'_>, format: &str) -> Result<ExitCode> {
    let tables = stats(root, opts).await?;
    match format {
        "table" => print!("{}", escape_control(&render_text(&tables))),
        "csv" => print!("{}", render_csv(&tables)),
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&tables).map_err(|e| Error::Internal(e.to_string()))?
        ),
        other => return job_error!("--format {other}: use table, json or csv"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn write_report(
    root: &str,
    opts: &StatsOptions<'_>,
    out: &Path,
    png: Option<&Path>,
) -> Result<ExitCode> {
    let report = report(root, opts).await?;
    std::fs::write(out, &report.html).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    if let Some(dir) = png {
        let files = write_pngs(&report.plots, dir)?;
        eprintln!("wrote {} PNG plots to {}", files.len(), dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn export_pairs(opts: &ExportOptions) -> Result<ExitCode> {
    let counts = export::export(opts).await?;
    eprintln!(
        "wrote {} pairs to {} ({} synthetic of {}, {} seed)",
        counts.synthetic + counts.seed,
        opts.output,
        counts.synthetic,
        counts.available,
        counts.seed
    );
    Ok(ExitCode::SUCCESS)
}

async fn select_seed(
    input: &Path,
    output: &Path,
    count: usize,
    format: Format,
) -> Result<ExitCode> {
    let report = seed(input, output, count, format).await?;
    for p in report.problems.iter().take(10) {
        let tree = if p.tree.is_empty() {
            String::new()
        } else {
            format!(" [tree {}]", p.tree)
        };
        eprintln!(
            "{}",
            escape_control(&format!("{}: {}{tree}", p.at, p.message))
        );
    }
    if report.problems.len() > 10 {
        eprintln!(
            "... {} more problems in seed_report.json",
            report.problems.len() - 10
        );
    }
    let summary: Vec<String> = problem_summary(&report.problems)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!(
        "{} messages in {} trees; {} malformed trees left out ({}); {} eligible pairs; kept {} in {}",
        report.messages,
        report.trees,
        report.malformed_trees,
        if summary.is_empty() {
            "none".to_string()
        } else {
            summary.join(" ")
        },
        report.eligible,
        report.kept,
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn batch(action: BatchAction) -> Result<ExitCode> {
    use object_store::{ObjectStoreExt, PutPayload};
    match action {
        BatchAction::Export { job, stage, to } => {
            let job = job.load()?;
            let lines = capture_stage_requests(&job, &stage).await?;
            let mut body = Vec::new();
            for line in &lines {
                body.extend(line.to_string().bytes());
                body.push(b'\n');
            }
            let to_location = Location::parse(&to)?;
            to_location
                .store
                .put(&to_location.prefix, PutPayload::from(body))
                .await?;
            eprintln!("wrote {} requests to {to}", lines.len());
        }
        BatchAction::Submit {
            job,
            stage,
            poll_secs,
        } => {
            let job = job.load()?;
            if !(poll_secs.is_finite() && poll_secs > 0.0) {
                return job_error!("--poll-secs {poll_secs}: give a positive number of seconds");
            }
            let poll = std::time::Duration::from_secs_f64(poll_secs.clamp(0.01, 86_400.0));
            let summary = crate::outputs::batch_api::submit(&job, &stage, poll).await?;
            eprintln!(
                "{} batches created, {} responses recorded in the journal, {} requests unanswered",
                summary.batches_created, summary.recorded, summary.unanswered
            );
            if summary.unanswered > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        BatchAction::Import { job, results } => {
            let job = job.load()?;
            let location = Location::parse(&results)?;
            let stream = location.store.get(&location.prefix).await?.into_stream();
            let (recorded, failed) =
                import_batch_results(&job, &results, result_lines(stream)).await?;
            eprintln!(
                "recorded {recorded} responses in the journal; {failed} failed lines (their requests will be sent by `run`)"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
