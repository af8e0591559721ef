//! This process's worker slot: `--worker I/N`, or read from Slurm job arrays, Kubernetes
//! Indexed Jobs and AWS Batch array jobs. A slot orders the units of work a process prefers
//! (shard number modulo N first) and holds a share of the budget; any process does whatever
//! is left, so no slot has to be filled for the job to finish.

use crate::error::{Error, Result};

/// This process's place among the workers of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker {
    /// 0-based index.
    pub index: usize,
    /// Number of workers.
    pub count: usize,
}

impl Default for Worker {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Worker {
    /// Parses `I/N` (0-based I).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || Error::Job(format!("--worker '{spec}' must be I/N with 0 <= I < N"));
        let (i, n) = spec.split_once('/').ok_or_else(bad)?;
        let worker = Worker {
            index: i.trim().parse().map_err(|_| bad())?,
            count: n.trim().parse().map_err(|_| bad())?,
        };
        (worker.index < worker.count)
            .then_some(worker)
            .ok_or_else(bad)
    }

    /// The worker from `--worker` if given, else from the scheduler's environment:
    /// `SLURM_ARRAY_TASK_ID` (count from `SLURM_ARRAY_TASK_COUNT`, or `_MAX`/`_MIN`),
    /// `JOB_COMPLETION_INDEX` (Kubernetes) or `AWS_BATCH_JOB_ARRAY_INDEX`, whose count comes
    /// from `--workers` or `BACKFORTH_WORKERS`. `env` looks variables up (the process
    /// environment in the binary).
    pub fn detect(
        flag: Option<&str>,
        workers: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        if let Some(spec) = flag {
            return Self::parse(spec);
        }
        let num = |name: &str| -> Result<Option<usize>> {
            env(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| Error::Job(format!("${name} = '{v}' is not a whole number")))
                })
                .transpose()
        };
        let count_from_flag =
            || -> Result<Option<usize>> { Ok(workers.or(num("BACKFORTH_WORKERS")?)) };
        let (index, count, source) = if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let count = match num("SLURM_ARRAY_TASK_COUNT")? {
                Some(c) => Some(c),
                None => match num("SLURM_ARRAY_TASK_MAX")? {
                    Some(max) if max >= min => Some(max + 1 - min),
                    Some(max) => {
                        return Err(Error::Job(format!(
                            "$SLURM_ARRAY_TASK_MAX = {max} is below $SLURM_ARRAY_TASK_MIN = {min}"
                        )));
                    }
                    None => None,
                },
            };
            (
                id.checked_sub(min),
                count.or(count_from_flag()?),
                "SLURM_ARRAY_TASK_ID",
            )
        } else if let Some(i) = num("JOB_COMPLETION_INDEX")? {
            (Some(i), count_from_flag()?, "JOB_COMPLETION_INDEX")
        } else if let Some(i) = num("AWS_BATCH_JOB_ARRAY_INDEX")? {
            (Some(i), count_from_flag()?, "AWS_BATCH_JOB_ARRAY_INDEX")
        } else {
            return Ok(Self::default());
        };
        let Some(count) = count else {
            return Err(Error::Job(format!(
                "${source} is set but the number of workers is not; pass --workers N or set BACKFORTH_WORKERS"
            )));
        };
        match index {
            Some(index) if index < count => Ok(Worker { index, count }),
            _ => Err(Error::Job(format!(
                "${source} gives a worker index outside 0..{count}"
            ))),
        }
    }

    /// True when shard number `shard` is among those this worker prefers first.
    pub fn owns(&self, shard: usize) -> bool {
        shard % self.count == self.index
    }
}
