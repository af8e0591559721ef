//! The DataFusion session every command uses, and the functions registered in it.

use std::sync::Arc;

use datafusion::execution::SessionStateBuilder;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

use datafusion::logical_expr::ScalarUDF;
use datafusion::logical_expr::async_udf::AsyncScalarUDF;

use crate::engine::llm_function::{LlmFunction, LlmFunctions};
use crate::engine::parsers::PARSERS;
use crate::engine::prepare_functions::{BenchmarkMatch, PrepareRules, UNITS, configured_udfs};
use crate::engine::pure::pure_udf;
use crate::engine::window::{LlmWindowRule, Window};
use crate::error::Result;
use crate::job::FunctionSpec;
use crate::llm::client::ModelClient;
use crate::llm::journal::JournalScope;
use crate::prepare::decontaminate::BenchmarkIndex;
use crate::prepare::tokens::TokenCounter;
use crate::storage::Location;

/// Builds the session every command uses: list-files cache off (stages read what earlier
/// stages wrote in the same process), no round-robin repartitions, LLM calls planned with
/// [`LlmWindowExec`](crate::engine::window::LlmWindowExec).
pub fn new_session(target_partitions: Option<usize>, window: Window) -> Result<SessionContext> {
    let mut config = SessionConfig::new();
    // Leaf-expression pushdown copies `call['text']` down to the call and so duplicates the
    // async LLM call once per field read (4 requests a row for backtranslated.sql).
    config
        .options_mut()
        .optimizer
        .enable_leaf_expression_pushdown = false;
    // A round-robin repartition above the LLM call coalesces its output into batches of
    // `batch_size` rows: every row of a shard, with its prompt and reply, waited there until the
    // shard's last reply (22-28 MiB of the heap at the job bench's peak). Shards running side
    // by side give the parallelism instead; hash repartitions and split file scans stay.
    config
        .options_mut()
        .optimizer
        .enable_round_robin_repartition = false;
    if let Some(p) = target_partitions {
        config = config.with_target_partitions(p.max(1));
    }
    let runtime = RuntimeEnvBuilder::new()
        .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
        .build_arc()?;
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_physical_optimizer_rule(Arc::new(LlmWindowRule::new(window)))
        .build();
    Ok(SessionContext::new_with_state(state))
}

/// Registers the object store of `location` with `ctx` (local disk is always known).
pub fn register_store(ctx: &SessionContext, location: &Location) {
    if location.store_url.scheme() != "file" {
        ctx.register_object_store(&location.store_url, Arc::clone(&location.store));
    }
}

/// Registers every backforth function in `ctx`: the LLM functions bound to their clients and
/// to the journal of the shard the session runs, the parsers, and the prepare helpers using `tokens` for `token_count` and `rules` for the
/// quality rules and MinHash signatures.
pub fn register_functions(
    ctx: &SessionContext,
    functions: &[(FunctionSpec, ModelClient)],
    journal: &Arc<JournalScope>,
    tokens: TokenCounter,
    rules: PrepareRules,
    benchmarks: Option<Arc<BenchmarkIndex>>,
) -> Result<()> {
    let mut llm = LlmFunctions::default();
    for (spec, client) in functions {
        let udf = Arc::new(LlmFunction::new(
            spec.clone(),
            client.clone(),
            Arc::clone(journal),
        )?);
        llm.insert(Arc::clone(&udf));
        ctx.register_udf(AsyncScalarUDF::new(udf).into_scalar_udf());
    }
    ctx.state_ref()
        .write()
        .config_mut()
        .set_extension(Arc::new(llm));
    for udf in scalar_udfs(tokens, rules) {
        ctx.register_udf(udf);
    }
    ctx.register_udf(BenchmarkMatch::udf(benchmarks));
    Ok(())
}

/// Every function that calls no LLM: parsers and prepare helpers.
pub fn scalar_udfs(tokens: TokenCounter, rules: PrepareRules) -> Vec<ScalarUDF> {
    let mut udfs = configured_udfs(tokens, rules);
    udfs.extend(UNITS.iter().chain(PARSERS).map(pure_udf));
    udfs
}
