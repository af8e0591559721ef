//! The `documents` table: one streaming partition per input file.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;

use crate::prepare::ingest::{IngestStats, ReadRules, document_batches, documents_schema};
use crate::storage::InputFile;

/// Builds the `documents` table over `files`.
pub fn documents_table(
    files: Vec<InputFile>,
    rules: ReadRules,
    stats: Arc<IngestStats>,
) -> datafusion::error::Result<StreamingTable> {
    let schema = documents_schema();
    let partitions: Vec<Arc<dyn PartitionStream>> = files
        .into_iter()
        .map(|file| {
            Arc::new(FilePartition {
                file,
                rules,
                stats: Arc::clone(&stats),
                schema: Arc::clone(&schema),
            }) as Arc<dyn PartitionStream>
        })
        .collect();
    StreamingTable::try_new(schema, partitions)
}

#[derive(Debug)]
struct FilePartition {
    file: InputFile,
    rules: ReadRules,
    stats: Arc<IngestStats>,
    schema: SchemaRef,
}

impl PartitionStream for FilePartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let stream = document_batches(self.file.clone(), self.rules, Arc::clone(&self.stats));
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        ))
    }
}
