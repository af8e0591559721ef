//! Progress of a running stage: shards and rows done, requests per second, tokens, errors and
//! an ETA. On a terminal one line is redrawn every second; otherwise a plain log line is
//! written every ten seconds (`BACKFORTH_PROGRESS_SECS` changes either), so batch logs stay
//! readable.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::llm::pool::LlmPool;

/// Counters a stage updates as it goes.
#[derive(Debug, Default)]
pub struct Progress {
    /// Shards this process has to do in the stage.
    pub shards_total: AtomicU64,
    /// Shards done (skipped ones included).
    pub shards_done: AtomicU64,
    /// Rows written (kept or dropped).
    pub rows: AtomicU64,
}

/// Reports a stage's progress until dropped.
pub struct Reporter {
    task: tokio::task::JoinHandle<()>,
    stalls: tokio::task::JoinHandle<()>,
    terminal: bool,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
        self.stalls.abort();
        if self.terminal {
            eprintln!();
        }
    }
}

impl Reporter {
    /// Starts reporting `stage`, reading `progress` and the pool's counters.
    pub fn start(stage: &str, progress: Arc<Progress>, pool: Arc<LlmPool>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let default = if terminal { 1.0 } else { 10.0 };
        let every = env_secs("BACKFORTH_PROGRESS_SECS", default);
        let stage = stage.to_string();
        let pool_for_stalls = Arc::clone(&pool);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let base = pool.usage();
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let line = describe(&stage, &progress, &pool, &base, started.elapsed());
                if terminal {
                    eprint!("\r{line}\x1b[K");
                    let _ = std::io::stderr().flush();
                } else {
                    tracing::info!("{line}");
                }
            }
        });
        let stalls = tokio::spawn(watch_for_stalls(pool_for_stalls));
        Self {
            task,
            stalls,
            terminal,
        }
    }
}

/// The seconds the variable `name` gives (`default` when unset or not a positive number),
/// held between 0.1 s and a day.
fn env_secs(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs.clamp(0.1, 86_400.0))
}

/// Warns when calls are open and nothing has come back for 60 s (`BACKFORTH_STALL_SECS`
/// changes it): a server that
/// restarted drops the requests it held without answering, and they hang until their
/// timeout (`timeout_secs`, 600 by default), the run showing 0 req/s and nothing else.
async fn watch_for_stalls(pool: Arc<LlmPool>) {
    let after = env_secs("BACKFORTH_STALL_SECS", 60.0);
    let look = (after / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let answered = || pool.returned();
    let (mut seen, mut since, mut said) = (answered(), Instant::now(), false);
    loop {
        tokio::time::sleep(look).await;
        let now = answered();
        if now != seen || pool.outstanding() == 0 {
            (seen, since, said) = (now, Instant::now(), false);
            continue;
        }
        if !said && since.elapsed() >= after {
            said = true;
            tracing::warn!(
                calls_open = pool.outstanding(),
                "No reply for {} s with calls open: the server may have restarted (requests it dropped hang until they time out, timeout_secs = {} s here) or be stuck. What was answered is journaled: stop and rerun once it is back, or lower timeout_secs for servers that restart.",
                after.as_secs(),
                pool.longest_timeout().as_secs()
            );
        }
    }
}

fn describe(
    stage: &str,
    progress: &Progress,
    pool: &LlmPool,
    base: &crate::llm::reply::Usage,
    elapsed: Duration,
) -> String {
    let usage = pool.usage().since(base);
    let secs = elapsed.as_secs_f64().max(0.001);
    let total = progress.shards_total.load(Ordering::Relaxed);
    let done = progress.shards_done.load(Ordering::Relaxed);
    let eta = if done > 0 && total > done {
        let left = secs * (total - done) as f64 / done as f64;
        format!(", ETA {}", human(left))
    } else {
        String::new()
    };
    format!(
        "{stage}: shards {done}/{total}, rows {}, {} calls open, {:.1} req/s, {} tokens, {} errors, {} elapsed{eta}",
        progress.rows.load(Ordering::Relaxed),
        pool.outstanding(),
        usage.requests as f64 / secs,
        usage.prompt_tokens + usage.completion_tokens,
        usage.failures,
        human(secs),
    )
}

fn human(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
