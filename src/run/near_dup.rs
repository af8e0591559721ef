//! Pass 2 of near-dedup: clusters of near-duplicate candidates from every shard's MinHash
//! signatures, as the table `near_duplicates` a stage's SQL can read.

use std::sync::Arc;

use datafusion::arrow::array::{AsArray, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, UInt32Type};
use datafusion::datasource::MemTable;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::job::catalog::NEAR_DUPLICATES;
use crate::job_error;
use crate::prepare::minhash::{Signatures, duplicates};
use crate::root::marker::read_stage_stats;
use crate::root::tables::register_stage_table;
use crate::run::plan::StagePlan;
use crate::run::runner::Runner;

/// The near-duplicate table of a run and the version of the stage it was computed from.
pub(super) struct NearDuplicates {
    pub(super) table: Arc<MemTable>,
    pub(super) version: String,
}

impl Runner<'_> {
    /// The near-duplicates of `from` (every shard's signatures) and the version of `from` they
    /// were computed on, which every shard reading them depends on.
    pub(super) async fn near_duplicates(
        &self,
        plan: &StagePlan,
        from: &str,
    ) -> Result<NearDuplicates> {
        self.require_complete(&plan.name, from).await?;
        let ctx = self.session()?;
        register_stage_table(&ctx, &self.root, from).await?;
        let schema = ctx.table(from).await?.schema().clone();
        if !schema.has_column_with_unqualified_name("minhash") {
            return job_error!(
                "stage '{}' reads {NEAR_DUPLICATES}, which needs the `minhash` signatures of '{from}': add [prepare.near_dedup] to the job",
                plan.name
            );
        }
        let params = self.job.prepare.near_dedup.unwrap_or_default();
        let mut stream = ctx
            .sql(&format!(
                "SELECT id, minhash FROM {from} WHERE minhash IS NOT NULL"
            ))
            .await?
            .execute_stream()
            .await?;
        let mut sigs = Signatures::new(params.num_perm());
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let ids = cast(batch.column(0), &DataType::Utf8)?;
            let ids = ids.as_string::<i32>();
            let listed = matches!(
                batch.column(1).data_type(),
                DataType::List(_) | DataType::LargeList(_) | DataType::ListView(_)
            );
            let column = cast(
                batch.column(1),
                &DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
            )
            .ok()
            .filter(|_| listed)
            .ok_or_else(|| {
                Error::Job(format!(
                    "stage '{}': the `minhash` column of '{from}' is not a list of signature values but {}; run '{from}' again with [prepare.near_dedup]",
                    plan.name,
                    batch.column(1).data_type()
                ))
            })?;
            let lists = column.as_list::<i32>();
            let values = lists.values().as_primitive::<UInt32Type>().values();
            for (r, ends) in lists.value_offsets().windows(2).enumerate() {
                let sig = &values[ends[0] as usize..ends[1] as usize];
                if !sigs.push(ids.value(r), sig) {
                    return job_error!(
                        "stage '{}': the signature of '{}' in '{from}' has {} values, but [prepare.near_dedup] makes {} (bands x rows): run '{from}' again with these settings",
                        plan.name,
                        ids.value(r),
                        sig.len(),
                        params.num_perm()
                    );
                }
            }
        }
        let found = tokio::task::spawn_blocking(move || duplicates(&sigs, &params))
            .await
            .map_err(|e| Error::Internal(format!("near-dedup task: {e}")))?;
        tracing::info!(stage = %plan.name, duplicates = found.len(), "Near-duplicates found.");
        let table_schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("kept_id", DataType::Utf8, false),
            Field::new("similarity", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            table_schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    found.iter().map(|d| d.id.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    found.iter().map(|d| d.kept_id.as_str()),
                )),
                Arc::new(Float64Array::from_iter_values(
                    found.iter().map(|d| d.similarity),
                )),
            ],
        )?;
        let table = MemTable::try_new(table_schema, vec![vec![batch]])?;
        let version = read_stage_stats(&self.root, from)
            .await?
            .map(|s| s.version())
            .unwrap_or_default();
        Ok(NearDuplicates {
            table: Arc::new(table),
            version,
        })
    }
}
