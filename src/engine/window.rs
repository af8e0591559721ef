//! A streaming, windowed replacement for DataFusion's `AsyncFuncExec`.
//!
//! `AsyncFuncExec` evaluates one whole batch per partition and waits for its slowest row
//! before it reads the next one, so the server's slots sit idle behind every batch's tail.
//! With heavy-tailed output lengths that wastes most of the server, even with several batches
//! in flight in order. [`LlmWindowExec`] works row by row: it keeps
//! a window of rows of a partition in flight, and whenever any row's reply arrives the next row
//! takes its place; replies leave in the order they complete, gathered back into batches. A
//! slow reply holds one slot, never a batch. Memory stays bounded by the window, not the
//! corpus. [`LlmWindowRule`] swaps the operator in after physical planning, so stage SQL is
//! unchanged.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::async_scalar_function::AsyncFuncExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::async_func::AsyncFuncExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, SendableRecordBatchStream,
    apply_expression_roots,
};
use futures::StreamExt;
use futures::future::try_join_all;

/// How many rows a partition keeps in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Rows of one partition whose calls may be pending at once.
    pub rows: usize,
}

/// Most rows gathered into one output batch.
const OUTPUT_BATCH_ROWS: usize = 1024;

impl Window {
    /// A window of twice `cap` rows per partition: one partition alone keeps an endpoint with
    /// `cap` slots full, with as many rows again queued for the slots that free up.
    pub fn for_cap(cap: usize) -> Self {
        Self {
            rows: 2 * cap.max(1),
        }
    }
}

/// Physical optimizer rule that replaces every `AsyncFuncExec` with [`LlmWindowExec`].
#[derive(Debug)]
pub struct LlmWindowRule {
    window: Window,
}

impl LlmWindowRule {
    /// A rule that plans LLM calls with `window`.
    pub fn new(window: Window) -> Self {
        Self { window }
    }
}

impl PhysicalOptimizerRule for LlmWindowRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(exec) = node.downcast_ref::<AsyncFuncExec>() else {
                return Ok(Transformed::no(node));
            };
            Ok(Transformed::yes(Arc::new(LlmWindowExec::new(
                exec,
                self.window,
            )?)))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "llm_window"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// For each expression, the index of the first expression computing the same call.
fn first_copies(exprs: &[Arc<AsyncFuncExpr>]) -> Vec<usize> {
    (0..exprs.len())
        .map(|i| {
            (0..i)
                .find(|&j| exprs[j].func.as_ref() == exprs[i].func.as_ref())
                .unwrap_or(i)
        })
        .collect()
}

/// Evaluates async (LLM) expressions over a window of input chunks; see the module docs.
#[derive(Debug)]
pub struct LlmWindowExec {
    exprs: Vec<Arc<AsyncFuncExpr>>,
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
    window: Window,
}

impl LlmWindowExec {
    fn new(exec: &AsyncFuncExec, window: Window) -> Result<Self> {
        #[expect(
            deprecated,
            reason = "the only accessor of the expressions in DataFusion 55"
        )]
        let exprs = exec.async_exprs().to_vec();
        Ok(Self {
            exprs,
            input: Arc::clone(exec.input()),
            properties: Arc::clone(exec.properties()),
            window,
        })
    }
}

impl DisplayAs for LlmWindowExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let exprs: Vec<String> = self.exprs.iter().map(|e| e.to_string()).collect();
        write!(
            f,
            "LlmWindowExec: window_rows={}, async_expr=[{}]",
            self.window.rows,
            exprs.join(", ")
        )
    }
}

impl ExecutionPlan for LlmWindowExec {
    fn name(&self) -> &str {
        "LlmWindowExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        apply_expression_roots(
            self.exprs
                .iter()
                .cloned()
                .map(|e| e as Arc<dyn PhysicalExpr>),
            f,
        )
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let rebuilt = AsyncFuncExec::try_new(self.exprs.clone(), children.swap_remove(0))?;
        Ok(Arc::new(LlmWindowExec::new(&rebuilt, self.window)?))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, Arc::clone(&context))?;
        let schema = self.schema();
        let schema_for_concat = Arc::clone(&schema);
        let exprs = Arc::new(self.exprs.clone());
        let config = Arc::clone(context.session_config().options());
        // One row per evaluation: a slow reply then holds back nothing but itself.
        let rows = input.flat_map(|batch| {
            let slices: Vec<Result<RecordBatch>> = match batch {
                Ok(batch) => (0..batch.num_rows())
                    .map(|i| Ok(batch.slice(i, 1)))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(slices)
        });
        let out_schema = Arc::clone(&schema);
        // Each distinct call is evaluated once, whatever copies the planner made.
        let first = Arc::new(first_copies(&exprs));
        let evaluated = rows
            .map(move |row| {
                let exprs = Arc::clone(&exprs);
                let config = Arc::clone(&config);
                let schema = Arc::clone(&out_schema);
                let first = Arc::clone(&first);
                async move {
                    let chunk = row?;
                    let originals: Vec<usize> =
                        (0..exprs.len()).filter(|&i| first[i] == i).collect();
                    let outputs = try_join_all(
                        originals
                            .iter()
                            .map(|&i| exprs[i].invoke_with_args(&chunk, Arc::clone(&config))),
                    )
                    .await?;
                    let mut by_original = std::collections::HashMap::new();
                    for (&i, output) in originals.iter().zip(outputs) {
                        by_original.insert(i, output.to_array(chunk.num_rows())?);
                    }
                    let mut columns = chunk.columns().to_vec();
                    columns.extend(first.iter().map(|i| Arc::clone(&by_original[i])));
                    Ok(RecordBatch::try_new(schema, columns)?)
                }
            })
            .buffer_unordered(self.window.rows)
            .ready_chunks(OUTPUT_BATCH_ROWS)
            .map(move |ready: Vec<Result<RecordBatch>>| {
                let rows = ready.into_iter().collect::<Result<Vec<_>>>()?;
                Ok(concat_batches(&schema_for_concat, &rows)?)
            });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, evaluated)))
    }
}
