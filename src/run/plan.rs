//! A run's stages as planned: each stage's SQL rendered, the tables it reads, the functions it
//! calls checked against the job's models, and its fingerprint.

use std::collections::BTreeMap;

use datafusion::common::config::Dialect;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::job::Job;
use crate::job::catalog::{DOCUMENTS, NEAR_DUPLICATES};
use crate::job::template::render_sql;
use crate::job_error;
use crate::run::manifest;

/// A stage as planned for this run: its SQL, the tables it reads, its fingerprint.
#[derive(Debug, Clone)]
pub struct StagePlan {
    /// The stage's name.
    pub name: String,
    /// Its SQL, rendered.
    pub sql: String,
    /// The tables the SQL reads.
    pub tables: Vec<String>,
    /// The digest of the stage's definition.
    pub fingerprint: String,
}

impl StagePlan {
    /// The one earlier stage a stage reads, when that is all it reads: such a stage runs shard
    /// by shard, each shard of its input giving one shard of its output.
    pub fn sharded_on<'a>(&'a self, job: &Job) -> Option<&'a str> {
        // The near-duplicate table is derived from the stage's input, not a second input.
        let inputs: Vec<&String> = self
            .tables
            .iter()
            .filter(|t| *t != NEAR_DUPLICATES)
            .collect();
        match inputs.as_slice() {
            [one] if job.stages.iter().any(|s| &s.name == *one) => Some(one.as_str()),
            _ => None,
        }
    }

    /// True when the stage reads the near-duplicate table of its input.
    pub fn reads_near_duplicates(&self) -> bool {
        self.tables.iter().any(|t| t == NEAR_DUPLICATES)
    }

    /// True when the stage reads the job's input documents.
    pub fn reads_documents(&self) -> bool {
        self.tables.iter().any(|t| t == DOCUMENTS)
    }
}

/// How the selected stages of a run are run, in job order.
#[derive(Debug)]
pub enum Step<'p> {
    /// A stage over all its input at once.
    Global(&'p StagePlan),
    /// Stages that run shard by shard, together: each shard goes through them in turn as
    /// soon as its upstream shard is published.
    Sharded(Vec<&'p StagePlan>),
}

/// The steps that run the stages of `plans` named in `selected`: consecutive sharded stages
/// on the same shards form one step, except that a stage reading the near-duplicates of a
/// stage in the step starts a new one (the clusters need that whole table).
pub fn steps<'p>(plans: &'p [StagePlan], job: &Job, selected: &[String]) -> Vec<Step<'p>> {
    let root_of = |plan: &'p StagePlan| {
        let mut current = plan;
        while let Some(up) = current.sharded_on(job) {
            match plans.iter().find(|p| p.name == up) {
                Some(next) => current = next,
                None => break,
            }
        }
        current.name.as_str()
    };
    let mut steps = Vec::new();
    for plan in plans.iter().filter(|p| selected.contains(&p.name)) {
        let Some(up) = plan.sharded_on(job) else {
            steps.push(Step::Global(plan));
            continue;
        };
        if let Some(Step::Sharded(group)) = steps.last_mut()
            && root_of(group[0]) == root_of(plan)
            && !(plan.reads_near_duplicates() && group.iter().any(|p| p.name == up))
        {
            group.push(plan);
            continue;
        }
        steps.push(Step::Sharded(vec![plan]));
    }
    steps
}

/// Renders every stage of `job` and checks what it reads and calls: each table must be the
/// input or an earlier stage, each function's model role declared. `ctx` has every function
/// registered.
pub fn plan_stages(
    job: &Job,
    ctx: &SessionContext,
) -> Result<(Vec<StagePlan>, BTreeMap<String, manifest::Fingerprint>)> {
    let mut rendered = Vec::new();
    for stage in &job.stages {
        let sql = render_sql(job, stage)?;
        let tables = referenced_tables(ctx, &sql, &stage.name)?;
        for f in job.functions_in(&sql) {
            if !job.models[&f.role].declared {
                return job_error!(
                    "stage '{}' calls {}, whose model role '{}' is not in the job: add [models.{}] (or pass --endpoint)",
                    stage.name,
                    f.name,
                    f.role,
                    f.role
                );
            }
        }
        for table in &tables {
            let known = table == DOCUMENTS
                || (table == NEAR_DUPLICATES && tables.len() == 2)
                || job
                    .stages
                    .iter()
                    .take_while(|s| s.name != stage.name)
                    .any(|s| &s.name == table);
            if !known {
                return job_error!(
                    "stage '{}' reads table '{table}', which is neither '{DOCUMENTS}' nor an earlier stage of this job",
                    stage.name
                );
            }
        }
        rendered.push((stage.name.clone(), sql, tables));
    }
    let fingerprints = manifest::fingerprint_stages(job, &rendered);
    let plans = rendered
        .into_iter()
        .map(|(name, sql, tables)| StagePlan {
            fingerprint: fingerprints[&name].digest(),
            name,
            sql,
            tables,
        })
        .collect();
    Ok((plans, fingerprints))
}

/// The tables `sql` (the SQL of `stage`) reads, common table expressions left out.
pub fn referenced_tables(ctx: &SessionContext, sql: &str, stage: &str) -> Result<Vec<String>> {
    let state = ctx.state();
    let statement = state
        .sql_to_statement(sql, &Dialect::Generic)
        .map_err(|e| Error::Job(format!("SQL of stage '{stage}': {e}")))?;
    Ok(state
        .resolve_table_references(&statement)?
        .into_iter()
        .map(|t| t.table().to_string())
        .collect())
}
