//! The command line as clap reads it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::Result;
use crate::job::{Job, Overrides};
use crate::outputs::export::{self, Format, TagMode};

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
        /// The job and what replaces parts of it.
        #[command(flatten)]
        job: JobArgs,
        /// Stages to run, comma-separated (e.g. `prepare` or `scored,curated`); earlier
        /// stages' outputs must exist.
        #[arg(long, value_delimiter = ',')]
        stages: Vec<String>,
        /// This process's worker slot, `I/N` (0-based): the units it prefers first and its
        /// share of the budget; read from Slurm, Kubernetes or AWS Batch array variables when
        /// absent.
        #[arg(long)]
        worker: Option<String>,
        /// Number of workers, when the scheduler gives only an index (Kubernetes, AWS Batch).
        #[arg(long, env = "BACKFORTH_WORKERS")]
        workers: Option<usize>,
        /// Continue although the job changed since the output was written: changed stages
        /// are recomputed, reusing journaled responses to unchanged requests.
        #[arg(long)]
        allow_changes: bool,
        /// Run on a store that does not refuse a second create of one object (some
        /// S3-compatible servers), trusting that no other process runs on this output.
        #[arg(long)]
        trust_single_writer: bool,
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
        /// The job and what replaces parts of it.
        #[command(flatten)]
        job: JobArgs,
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
        /// Output file (path or URL); a folder for `--format hf`.
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
        /// Do not write the dataset card (`<name>.card.md`; README.md of a `--format hf`
        /// folder).
        #[arg(long)]
        no_card: bool,
        /// `--format hf`: the share of pairs held out as the `test` split (chosen by
        /// `--sample-seed`).
        #[arg(long, default_value_t = 0.0)]
        test_fraction: f64,
        /// `--format hf`: the license the card declares (a Hub license id).
        #[arg(long, default_value = "other")]
        license: String,
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
        #[arg(long, default_value_t = crate::outputs::seed::DEFAULT_COUNT)]
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
        /// The job and what replaces parts of it.
        #[command(flatten)]
        job: JobArgs,
        /// The stage whose requests are written (its inputs must be complete).
        #[arg(long)]
        stage: String,
        /// Where the requests go (path or URL).
        #[arg(long)]
        to: String,
    },
    /// Send a stage's unanswered requests through the OpenAI Batch API of its model's endpoint,
    /// wait for the batches, record the results in the journal, and resubmit what failed or
    /// expired; batch ids are kept under the output root, so rerunning resumes polling.
    Submit {
        /// The job and what replaces parts of it.
        #[command(flatten)]
        job: JobArgs,
        /// The stage whose requests are sent (its inputs must be complete).
        #[arg(long)]
        stage: String,
        /// Seconds between polls.
        #[arg(long, default_value_t = 30.0)]
        poll_secs: f64,
    },
    /// Record a batch's results (`vllm run-batch` output or an OpenAI batch output file).
    Import {
        /// The job and what replaces parts of it.
        #[command(flatten)]
        job: JobArgs,
        /// The results file (path or URL).
        results: String,
    },
}

/// The job file and the flags that replace parts of it, shared by every command that runs a
/// job. Endpoints and models matter to `batch` too: they are part of each request's key.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job file (TOML).
    pub job: PathBuf,
    /// Input files, directories or globs, replacing the job's (repeatable).
    #[arg(long = "input", value_name = "PATH")]
    pub inputs: Vec<String>,
    /// Output root, replacing the job's.
    #[arg(long)]
    pub output: Option<String>,
    /// Endpoint for every model role: an OpenAI-compatible base URL (several, comma-separated,
    /// are replicas), or `mock`.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Model name for every model role.
    #[arg(long)]
    pub model: Option<String>,
    /// Cap on requests in flight per endpoint.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// A folder besides the job's own whose files the job may read: templates, schemas, SQL,
    /// benchmarks (repeatable).
    #[arg(long = "allow-path", value_name = "DIR")]
    pub allow_paths: Vec<PathBuf>,
}

impl JobArgs {
    /// Reads the job file and applies the flags.
    pub fn load(self) -> Result<Job> {
        let overrides = Overrides {
            inputs: self.inputs,
            output: self.output,
            endpoint: self.endpoint,
            model: self.model,
            concurrency: self.concurrency,
            allow_paths: self.allow_paths,
        };
        Job::load(&self.job, &overrides)
    }
}
