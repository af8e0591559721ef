//! Errors that say whose fault they are: the job's, the data's, the run's, or ours.

use datafusion::error::DataFusionError;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The cause of an [`Error::Failed`].
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Every failure backforth reports, grouped by who has to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job file or the command line asks for something that cannot work; fix the job.
    #[error("job error: {0}")]
    Job(String),
    /// A record of the input is malformed at a known place; fix the data or skip such lines.
    #[error("{file}:{line}: {message}")]
    Input {
        /// File (path or URL) holding the record.
        file: String,
        /// 1-based line (JSONL) or row (Parquet) number.
        line: u64,
        /// What is wrong, naming the column, and what to do about it.
        message: String,
    },
    /// Running a stage failed (a server refusing every request, a budget spent, ...).
    #[error("execution error: {0}")]
    Execution(String),
    /// Running a stage failed because something underneath did (storage, Arrow, I/O, HTTP);
    /// `context` says what was being done.
    #[error("execution error: {context}: {source}")]
    Failed {
        /// What was being done, e.g. "writing out/scored/part-00000.parquet".
        context: String,
        /// What failed underneath.
        #[source]
        source: Cause,
    },
    /// An error raised inside the query engine; its own message says plan or execution.
    #[error("{0}")]
    DataFusion(#[source] Box<DataFusionError>),
    /// An invariant of backforth broke: a bug to report.
    #[error("internal error (a bug in backforth, please report it): {0}")]
    Internal(String),
}

impl Error {
    /// An [`Error::Failed`]: `source` failed while doing `context`.
    pub fn failed(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Error::Failed {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Says what was being done when a lower layer failed.
pub trait Context<T> {
    /// Wraps the error as [`Error::Failed`] with the context `what()` gives.
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Cause>> Context<T> for std::result::Result<T, E> {
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::failed(what(), e))
    }
}

impl From<DataFusionError> for Error {
    fn from(err: DataFusionError) -> Self {
        // An error raised inside one of our UDFs travels through DataFusion wrapped; unwrap it so
        // the user sees our message (with file and line) and not the engine's wrapping.
        match err.find_root() {
            DataFusionError::External(inner) => match inner.downcast_ref::<Error>() {
                Some(Error::Input {
                    file,
                    line,
                    message,
                }) => Error::Input {
                    file: file.clone(),
                    line: *line,
                    message: message.clone(),
                },
                Some(other) => Error::Execution(other.to_string()),
                None => Error::DataFusion(Box::new(err)),
            },
            _ => Error::DataFusion(Box::new(err)),
        }
    }
}

impl From<object_store::Error> for Error {
    fn from(err: object_store::Error) -> Self {
        Error::failed("storage", err)
    }
}

impl From<datafusion::arrow::error::ArrowError> for Error {
    fn from(err: datafusion::arrow::error::ArrowError) -> Self {
        Error::failed("arrow", err)
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::failed("i/o", err)
    }
}

impl From<Error> for DataFusionError {
    fn from(err: Error) -> Self {
        DataFusionError::External(Box::new(err))
    }
}

/// Builds an `Err(Error::Job(..))` with `format!` syntax.
#[macro_export]
macro_rules! job_error {
    ($($arg:tt)*) => { Err($crate::error::Error::Job(format!($($arg)*))) };
}

/// Builds an `Err(Error::Execution(..))` with `format!` syntax.
#[macro_export]
macro_rules! execution_error {
    ($($arg:tt)*) => { Err($crate::error::Error::Execution(format!($($arg)*))) };
}
