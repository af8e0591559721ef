//! A stage's SQL template rendered with the job's settings, and what the SQL calls.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{Expr, visit_expressions};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::error::{Error, Result};
use crate::job::{Job, StageSpec};

/// Renders a stage's SQL template with the job's settings: `prepare`, `curate`, `params`,
/// `stage` (its `name`, `from` and `vars`) and `functions` (each one's `role` and `model`).
/// The `sql_string` filter quotes a value as a SQL string literal.
pub fn render_sql(job: &Job, stage: &StageSpec) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_filter("sql_string", |value: String| {
        format!("'{}'", value.replace('\'', "''"))
    });
    let mut stage_vars = stage.vars.clone();
    stage_vars.insert("name".into(), stage.name.clone().into());
    if let Some(from) = &stage.from {
        stage_vars.insert("from".into(), from.clone().into());
    }
    let functions: BTreeMap<&str, BTreeMap<&str, &str>> = job
        .functions
        .iter()
        .map(|f| {
            let model = job.models.get(&f.role).map_or("", |m| m.model.as_str());
            (
                f.name.as_str(),
                BTreeMap::from([("role", f.role.as_str()), ("model", model)]),
            )
        })
        .collect();
    let ctx = minijinja::context! {
        prepare => minijinja::Value::from(minijinja::value::Serde(&job.prepare)),
        curate => minijinja::context! { threshold => job.threshold, iteration => job.curate_iteration },
        params => minijinja::Value::from(minijinja::value::Serde(&job.params)),
        stage => minijinja::Value::from(minijinja::value::Serde(&stage_vars)),
        functions => minijinja::Value::from(minijinja::value::Serde(&functions)),
    };
    env.render_str(&stage.sql, ctx)
        .map_err(|e| Error::Job(format!("SQL template of stage '{}': {e}", stage.name)))
}

/// The functions `sql` calls, by lower-cased name (none when it does not parse: the stage's
/// planning reports that).
pub fn called_functions(sql: &str) -> BTreeSet<String> {
    let mut called = BTreeSet::new();
    for statement in Parser::parse_sql(&GenericDialect {}, sql).unwrap_or_default() {
        let _ = visit_expressions(&statement, |expr| {
            if let Expr::Function(f) = expr {
                called.insert(f.name.to_string().to_lowercase());
            }
            ControlFlow::<()>::Continue(())
        });
    }
    called
}
