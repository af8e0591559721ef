//! A finished run read back as tables: every complete stage, the rows each dropped, the
//! seed pairs; and the documented shape of a stage's output.

use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::TryStreamExt;

use crate::engine::session::{new_session, register_store};
use crate::engine::window::Window;
use crate::error::{Error, Result};
use crate::execution_error;
use crate::root::marker::read_stage_stats;
use crate::root::names::{DROPPED_DIR, SEED, dropped_table};
use crate::storage::Location;

/// A session over the run under `root`: every complete stage registered as a table (for the
/// commands that read a run: `sql`, `stats`, `report`, `export`). Fails when there is none.
pub async fn open_root(root: &Location) -> Result<(SessionContext, Vec<String>)> {
    let ctx = new_session(None, Window::for_cap(1))?;
    register_store(&ctx, root);
    let stages = require_any_stage(root).await?;
    let registered = register_complete_stages(&ctx, root, stages.clone()).await?;
    register_dropped_rows(&ctx, root, &registered).await?;
    Ok((ctx, stages))
}

/// Registers the rows each of `stages` (complete, registered) dropped (`<stage>/_dropped/`,
/// the reason in `drop_reason`) as the table `<stage>_dropped`, so SQL can show what a rule
/// removed (empty when the stage dropped nothing); no stage's own table is shadowed.
async fn register_dropped_rows(
    ctx: &SessionContext,
    root: &Location,
    stages: &[String],
) -> Result<()> {
    for stage in stages {
        let table = dropped_table(stage);
        if stages.contains(&table) {
            continue;
        }
        let dir = root.child(stage).child(DROPPED_DIR);
        let mut parts = dir.store.list(Some(&dir.prefix));
        if parts.try_next().await?.is_some() {
            ctx.register_parquet(&table, dir.dir_url(), ParquetReadOptions::default())
                .await?;
        }
    }
    Ok(())
}

/// Registers every complete stage output under `root` as a table; returns their names.
pub async fn register_complete_stages(
    ctx: &SessionContext,
    root: &Location,
    stages: impl IntoIterator<Item = String>,
) -> Result<Vec<String>> {
    let mut registered = Vec::new();
    for stage in stages {
        if read_stage_stats(root, &stage).await?.is_some() {
            register_stage_table(ctx, root, &stage).await?;
            registered.push(stage);
        }
    }
    Ok(registered)
}

/// Registers the output of `stage` under `root` as the table `stage`, replacing any.
pub async fn register_stage_table(
    ctx: &SessionContext,
    root: &Location,
    stage: &str,
) -> Result<()> {
    ctx.deregister_table(stage)?;
    ctx.register_parquet(
        stage,
        root.child(stage).dir_url(),
        ParquetReadOptions::default(),
    )
    .await?;
    Ok(())
}

/// Stage names found under `root` (directories with a `_SUCCESS` marker).
pub async fn complete_stages_under(root: &Location) -> Result<Vec<String>> {
    let listing = root.store.list_with_delimiter(Some(&root.prefix)).await?;
    let mut names = Vec::new();
    for dir in listing.common_prefixes {
        let Some(name) = dir.filename() else { continue };
        if !name.starts_with(['_', '.']) && read_stage_stats(root, name).await?.is_some() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Registers the seed pairs under `dir` (written by `backforth seed`) as the table `seed`.
pub async fn register_seed(ctx: &SessionContext, dir: &str) -> Result<()> {
    let location = Location::parse(dir)?;
    register_store(ctx, &location);
    ctx.register_parquet(SEED, location.dir_url(), Default::default())
        .await
        .map_err(|e| {
            Error::Job(format!(
                "--seed {}: no seed pairs there ({e}); write them with `backforth seed`",
                location.describe()
            ))
        })
}

/// Fails when `root` holds no complete stage at all.
pub async fn require_any_stage(root: &Location) -> Result<Vec<String>> {
    let stages = complete_stages_under(root).await?;
    if stages.is_empty() {
        return execution_error!(
            "{} holds no complete stage output; run `backforth run JOB` first",
            root.describe()
        );
    }
    Ok(stages)
}

/// A stage's output schema as documented in `schemas/`: logical types (`string` for every
/// string encoding), nullability, and nested fields.
pub fn schema_doc(schema: &Schema) -> serde_json::Value {
    serde_json::Value::Array(schema.fields().iter().map(|f| field_doc(f)).collect())
}

fn field_doc(field: &Field) -> serde_json::Value {
    serde_json::json!({
        "name": field.name(),
        "type": type_doc(field.data_type()),
        "nullable": field.is_nullable(),
    })
}

fn type_doc(t: &DataType) -> serde_json::Value {
    use serde_json::json;
    match t {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => json!("string"),
        DataType::Struct(fields) => {
            json!({"struct": fields.iter().map(|f| field_doc(f)).collect::<Vec<_>>()})
        }
        DataType::List(item) | DataType::LargeList(item) => {
            json!({"list": type_doc(item.data_type())})
        }
        other => json!(other.to_string().to_lowercase()),
    }
}
