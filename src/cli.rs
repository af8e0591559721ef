//! Command-line interface: argument definitions and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};
use crate::export::{self, ExportOptions, Format, TagMode};
use crate::job::{Job, Overrides};
use crate::pipeline::{self, RunOptions, RunSummary};
use crate::storage::Location;
use crate::worker::Worker;

/// Turns web text into instruction-tuning data with instruction back-and-forth translation.
#[derive(Debug, Parser)]
#[command(name = "backforth", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a job's stages (all, or those named by --stages).
    Run {
        /// The job file (TOML).
        job: PathBuf,
        /// Input files, directories or globs, replacing the job's (repeatable).
        #[arg(long = "input", value_name = "PATH")]
        inputs: Vec<String>,
        /// Output root, replacing the job's.
        #[arg(long)]
        output: Option<String>,
        /// Endpoint for every model role: an OpenAI-compatible base URL, or `mock`.
        #[arg(long)]
        endpoint: Option<String>,
        /// Model name for every model role.
        #[arg(long)]
        model: Option<String>,
        /// Cap on requests in flight per endpoint.
        #[arg(long)]
        concurrency: Option<usize>,
        /// Stages to run, comma-separated (e.g. `prepare` or `scored,curated`); earlier
        /// stages' outputs must exist.
        #[arg(long, value_delimiter = ',')]
        stages: Vec<String>,
        /// This process's share of the shards, `I/N` (0-based); read from Slurm, Kubernetes
        /// or AWS Batch array variables when absent.
        #[arg(long)]
        worker: Option<String>,
        /// Number of workers, when the scheduler gives only an index (Kubernetes, AWS Batch).
        #[arg(long, env = "BACKFORTH_WORKERS")]
        workers: Option<usize>,
        /// Continue although the job changed since the output was written: changed stages
        /// are recomputed, reusing journaled responses to unchanged requests.
        #[arg(long)]
        allow_changes: bool,
    },
    /// Offline batches: write a stage's requests for `vllm run-batch` (or the OpenAI Batch
    /// API), and record the results in the journal so `run` uses them without sending.
    Batch {
        /// What to do.
        #[command(subcommand)]
        action: BatchAction,
    },
    /// Requests, tokens and cost per stage, before anything is paid (the input stage runs;
    /// it calls no LLM).
    Estimate {
        /// The job file.
        job: PathBuf,
        /// Input files, directories or globs, replacing the job's (repeatable).
        #[arg(long = "input", value_name = "PATH")]
        inputs: Vec<String>,
        /// Output root, replacing the job's.
        #[arg(long)]
        output: Option<String>,
        /// Candidates whose prompts are rendered and counted.
        #[arg(long, default_value_t = 200)]
        sample: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The funnel and the data statistics of a run: score histograms per iteration and model,
    /// transitions, yield, lengths, diversity, overlap; the queries are `sql/analytics/*.sql`
    /// plus any in `--analytics DIR`.
    Stats {
        /// Output root of a run.
        root: String,
        /// `table` (default), `json` or `csv`.
        #[arg(long, default_value = "table")]
        format: String,
        /// A directory of more analytics queries (`*.sql`) to report.
        #[arg(long)]
        analytics: Option<PathBuf>,
        /// Tokenizer for token lengths: `cl100k_base`, `o200k_base`, or a `tokenizer.json`
        /// (default: the job's, else cl100k_base, labelled as an approximation).
        #[arg(long)]
        tokenizer: Option<String>,
        /// Rows per subset for the diversity comparison (default: the smallest subset's size).
        #[arg(long)]
        sample: Option<u64>,
        /// Human labels of some pairs (`id,label` CSV or JSON lines) for the judge's precision
        /// and recall.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Seed pairs (a directory written by `backforth seed`) to compare as a subset.
        #[arg(long)]
        seed: Option<String>,
    },
    /// One self-contained HTML file with the tables of `stats`, plots as inline SVG (and as PNG
    /// with `--png`), and pairs to read per score level.
    Report {
        /// Output root of a run.
        root: String,
        /// Where the HTML goes.
        #[arg(long)]
        out: PathBuf,
        /// Tokenizer for token lengths (as for `stats`).
        #[arg(long)]
        tokenizer: Option<String>,
        /// Human labels for the judge agreement table (as for `stats`).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Seed pairs to compare as a subset (as for `stats`).
        #[arg(long)]
        seed: Option<String>,
        /// Also write every plot as a PNG file into this directory (for papers and slides).
        #[arg(long)]
        png: Option<PathBuf>,
    },
    /// Run SQL over the stage outputs under a root; stage names are table names.
    Sql {
        /// Output root of a run.
        #[arg(long)]
        root: String,
        /// The query.
        query: String,
    },
    /// Write pairs in a trainer's format.
    Export {
        /// Output root of a run.
        #[arg(long)]
        root: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "openai-chat")]
        format: Format,
        /// Output file (path or URL).
        #[arg(long)]
        output: String,
        /// Stage whose pairs are exported.
        #[arg(long, default_value = "rewritten")]
        table: String,
        /// Where the tag sentence goes.
        #[arg(long, value_enum, default_value = "none")]
        tag: TagMode,
        /// The tag sentence of the synthetic pairs.
        #[arg(long, default_value = export::WEB_TAG)]
        tag_text: String,
        /// Mix in the seed pairs of this directory (written by `backforth seed`).
        #[arg(long)]
        seed: Option<String>,
        /// The tag sentence of the seed pairs.
        #[arg(long, default_value = export::SEED_TAG)]
        seed_tag_text: String,
        /// Sample this many synthetic pairs (3200, 12800, 51200, ...); default all.
        #[arg(long)]
        size: Option<usize>,
        /// Seed of the sample and of the mixed order: the same seed gives the same file.
        #[arg(long, default_value_t = 0)]
        sample_seed: u64,
        /// Do not write the dataset card (README.md) beside the output.
        #[arg(long)]
        no_card: bool,
    },
    /// Seed pairs from Open Assistant trees: first turn, English, reply ranked 0, best quality
    /// labels first; with the forward and reversed pairs for training the scorer and the
    /// backward model.
    Seed {
        /// OASST messages (flat JSONL, .gz, .zst or Parquet) or trees JSONL.
        #[arg(long)]
        input: PathBuf,
        /// Directory for seed.parquet, forward/backward pairs and seed_report.json.
        #[arg(long)]
        output: PathBuf,
        /// Pairs to keep.
        #[arg(long, default_value_t = crate::seed::DEFAULT_COUNT)]
        count: usize,
        /// Format of the forward and backward training files.
        #[arg(long, value_enum, default_value = "openai-chat")]
        format: Format,
    },
}

/// `batch` subcommands.
#[derive(Debug, Subcommand)]
pub enum BatchAction {
    /// Write the requests a stage would send as OpenAI batch JSONL (`custom_id` = request key).
    Export {
        /// The job file.
        job: PathBuf,
        /// The stage whose requests are written (its inputs must be complete).
        #[arg(long)]
        stage: String,
        /// Where the requests go (path or URL).
        #[arg(long)]
        to: String,
        /// Output root, replacing the job's.
        #[arg(long)]
        output: Option<String>,
        /// Model name for every role, as given to `run` (it is part of each request).
        #[arg(long)]
        model: Option<String>,
    },
    /// Send a stage's unanswered requests through the OpenAI Batch API of its model's endpoint,
    /// wait for the batches, record the results in the journal, and resubmit what failed or
    /// expired; batch ids are kept under the output root, so rerunning resumes polling.
    Submit {
        /// The job file.
        job: PathBuf,
        /// The stage whose requests are sent (its inputs must be complete).
        #[arg(long)]
        stage: String,
        /// Output root, replacing the job's.
        #[arg(long)]
        output: Option<String>,
        /// Endpoint for every model role (the Batch API's base URL).
        #[arg(long)]
        endpoint: Option<String>,
        /// Model name for every role.
        #[arg(long)]
        model: Option<String>,
        /// Seconds between polls.
        #[arg(long, default_value_t = 30.0)]
        poll_secs: f64,
    },
    /// Record a batch's results (`vllm run-batch` output or an OpenAI batch output file).
    Import {
        /// The job file.
        job: PathBuf,
        /// The results file (path or URL).
        results: String,
        /// Output root, replacing the job's.
        #[arg(long)]
        output: Option<String>,
    },
}

/// Entry point of the binary: parse, run, print errors, map to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
            eprintln!("error: {e}");
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
            inputs,
            output,
            endpoint,
            model,
            concurrency,
            stages,
            worker,
            workers,
            allow_changes,
        } => {
            let worker = Worker::detect(worker.as_deref(), workers, |k| std::env::var(k).ok())?;
            let overrides = Overrides {
                inputs,
                output,
                endpoint,
                model,
                concurrency,
            };
            let job = Job::load(&job, &overrides)?;
            let summary = pipeline::run(
                &job,
                &RunOptions {
                    stages,
                    worker,
                    allow_changes,
                },
            )
            .await?;
            eprint!("{}", render_summary(&job, &summary));
            let failures = summary.llm_failures();
            if failures > 0 {
                eprintln!(
                    "{failures} row(s) lost their LLM call after every retry; they are in <stage>/_dropped/ with reason llm_error"
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Batch { action } => batch(action).await,
        Command::Estimate {
            job,
            inputs,
            output,
            sample,
            json,
        } => {
            let overrides = Overrides {
                inputs,
                output,
                ..Overrides::default()
            };
            let job = Job::load(&job, &overrides)?;
            let stages = crate::estimate::estimate(&job, sample).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&stages)
                        .map_err(|e| Error::Internal(e.to_string()))?
                );
            } else {
                print!("{}", render_estimate(&stages));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats {
            root,
            format,
            analytics,
            tokenizer,
            sample,
            labels,
            seed,
        } => {
            let opts = crate::stats::StatsOptions {
                analytics: analytics.as_deref(),
                tokenizer: tokenizer.as_deref(),
                sample,
                labels: labels.as_deref(),
                seed: seed.as_deref(),
            };
            let tables = crate::stats::stats(&root, &opts).await?;
            match format.as_str() {
                "table" => print!("{}", crate::stats::render_text(&tables)),
                "csv" => print!("{}", crate::stats::render_csv(&tables)),
                "json" => println!(
                    "{}",
                    serde_json::to_string_pretty(&tables)
                        .map_err(|e| Error::Internal(e.to_string()))?
                ),
                other => {
                    return Err(Error::Job(format!(
                        "--format {other}: use table, json or csv"
                    )));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            root,
            out,
            tokenizer,
            labels,
            seed,
            png,
        } => {
            let opts = crate::stats::StatsOptions {
                tokenizer: tokenizer.as_deref(),
                labels: labels.as_deref(),
                seed: seed.as_deref(),
                ..Default::default()
            };
            let report = crate::report::report(&root, &opts).await?;
            std::fs::write(&out, &report.html)
                .map_err(|e| Error::Execution(format!("writing {}: {e}", out.display())))?;
            eprintln!("wrote {}", out.display());
            if let Some(dir) = png {
                let files = crate::report::write_pngs(&report.plots, &dir)?;
                eprintln!("wrote {} PNG plots to {}", files.len(), dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sql { root, query } => {
            print!("{}", sql(&root, &query).await?);
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
        } => {
            let counts = export::export(&ExportOptions {
                root,
                table,
                format,
                output: output.clone(),
                tag,
                tag_text,
                seed,
                seed_tag_text,
                size,
                sample_seed,
                card: !no_card,
            })
            .await?;
            eprintln!(
                "wrote {} pairs to {output} ({} synthetic of {}, {} seed)",
                counts.synthetic + counts.seed,
                counts.synthetic,
                counts.available,
                counts.seed
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Seed {
            input,
            output,
            count,
            format,
        } => {
            let report = crate::seed::seed(&input, &output, count, format).await?;
            for p in report.problems.iter().take(10) {
                let tree = if p.tree.is_empty() {
                    String::new()
                } else {
                    format!(" [tree {}]", p.tree)
                };
                eprintln!("{}: {}{tree}", p.at, p.message);
            }
            if report.problems.len() > 10 {
                eprintln!(
                    "... {} more problems in seed_report.json",
                    report.problems.len() - 10
                );
            }
            let summary: Vec<String> = crate::seed::problem_summary(&report.problems)
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
    }
}

async fn batch(action: BatchAction) -> Result<ExitCode> {
    use object_store::{ObjectStoreExt, PutPayload};
    match action {
        BatchAction::Export {
            job,
            stage,
            to,
            output,
            model,
        } => {
            let overrides = Overrides {
                output,
                model,
                ..Overrides::default()
            };
            let job = Job::load(&job, &overrides)?;
            let lines = pipeline::capture_stage_requests(&job, &stage).await?;
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
            output,
            endpoint,
            model,
            poll_secs,
        } => {
            let overrides = Overrides {
                output,
                endpoint,
                model,
                ..Overrides::default()
            };
            let job = Job::load(&job, &overrides)?;
            let poll = std::time::Duration::from_secs_f64(poll_secs.max(0.01));
            let summary = crate::openai_batch::submit(&job, &stage, poll).await?;
            eprintln!(
                "{} batches created, {} responses recorded in the journal, {} requests unanswered",
                summary.batches_created, summary.recorded, summary.unanswered
            );
            if summary.unanswered > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        BatchAction::Import {
            job,
            results,
            output,
        } => {
            let job = Job::load(
                &job,
                &Overrides {
                    output,
                    ..Overrides::default()
                },
            )?;
            let location = Location::parse(&results)?;
            let bytes = location.store.get(&location.prefix).await?.bytes().await?;
            let text = String::from_utf8_lossy(&bytes);
            let (recorded, failed) = pipeline::import_batch_results(&job, &results, &text).await?;
            eprintln!(
                "recorded {recorded} responses in the journal; {failed} failed lines (their requests will be sent by `run`)"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `query` over the complete stages under `root` and renders the result as a table.
pub async fn sql(root: &str, query: &str) -> Result<String> {
    let root = Location::parse(root)?;
    let (ctx, _) = pipeline::open_root(&root).await?;
    let tokens = crate::tokens::TokenCounter::load("cl100k_base", std::path::Path::new("."))?;
    for udf in crate::udf::scalar_udfs(tokens, Default::default()) {
        ctx.register_udf(udf);
    }
    let batches = ctx.sql(query).await?.collect().await?;
    let table = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
        .map_err(|e| Error::Execution(format!("formatting the result: {e}")))?;
    Ok(format!("{table}\n"))
}

fn render_estimate(stages: &[crate::estimate::StageEstimate]) -> String {
    let mut out = format!(
        "{:<16} {:>10} {:>10} {:>14} {:>18} {:>18} {:>10}\n",
        "stage", "rows", "requests", "prompt tokens", "completion tokens", "(at most)", "cost $"
    );
    let mut total = crate::estimate::StageEstimate::default();
    for s in stages {
        out.push_str(&format!(
            "{:<16} {:>10.0} {:>10.0} {:>14.0} {:>18.0} {:>18.0} {:>10.2}\n",
            s.stage,
            s.rows,
            s.requests,
            s.prompt_tokens,
            s.completion_tokens,
            s.completion_tokens_max,
            s.cost_usd
        ));
        total.requests += s.requests;
        total.prompt_tokens += s.prompt_tokens;
        total.completion_tokens += s.completion_tokens;
        total.completion_tokens_max += s.completion_tokens_max;
        total.cost_usd += s.cost_usd;
    }
    out.push_str(&format!(
        "{:<16} {:>10} {:>10.0} {:>14.0} {:>18.0} {:>18.0} {:>10.2}\n",
        "total",
        "",
        total.requests,
        total.prompt_tokens,
        total.completion_tokens,
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
