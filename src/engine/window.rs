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
use std::time::Duration;

use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::compute::interleave;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{internal_datafusion_err, internal_err};
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_expr::async_scalar_function::AsyncFuncExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::async_func::AsyncFuncExec;
use datafusion::physical_plan::common::spawn_buffered;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, SendableRecordBatchStream,
    apply_expression_roots,
};
use futures::future::join_all;
use futures::{Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;

use crate::engine::args::string_columns;
use crate::engine::llm_function::{LlmFunction, LlmFunctions, Sample};

/// How many rows a partition keeps in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Rows of one partition whose calls may be pending at once.
    pub rows: usize,
}

/// Most rows gathered into one output batch.
const OUTPUT_BATCH_ROWS: usize = 1024;

/// Longest an answered row waits for others to share its output batch. Replies to a full
/// window arrive one at a time; a batch per reply cost more CPU downstream (arrays built,
/// projected, coalesced, each per row) than the HTTP call itself at 1,024 slots.
const OUTPUT_BATCH_WAIT: Duration = Duration::from_millis(20);

impl Window {
    /// A window of twice `cap` rows per partition: one partition alone keeps an endpoint with
    /// `cap` slots full, with as many rows again queued for the slots that free up. The
    /// partitions and shards running at once share each role's budget of rows on top.
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

/// The distinct calls among `exprs`: for each expression the number of the call it computes
/// (numbered in the order they first come), and for each call its first expression.
fn distinct_calls(exprs: &[Arc<AsyncFuncExpr>]) -> (Vec<usize>, Vec<usize>) {
    let mut call_of = Vec::with_capacity(exprs.len());
    let mut firsts: Vec<usize> = Vec::new();
    for expr in exprs {
        match firsts
            .iter()
            .position(|&j| exprs[j].func.as_ref() == expr.func.as_ref())
        {
            Some(call) => call_of.push(call),
            None => {
                call_of.push(firsts.len());
                firsts.push(call_of.len() - 1);
            }
        }
    }
    (call_of, firsts)
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
        // Read a batch ahead in a task of its own: the input's reader (a zstd context, page
        // buffers and builders per column of a Parquet scan) then ends with its last batch
        // instead of living on until the window has worked through that batch's rows.
        let input = spawn_buffered(self.input.execute(partition, Arc::clone(&context))?, 1);
        let schema = self.schema();
        // Each distinct call is made once, whatever copies the planner made.
        let (call_of, firsts) = distinct_calls(&self.exprs);
        let calls = Arc::new(self.calls(&context, &firsts)?);
        let to_call = Arc::clone(&calls);
        // One row per call: a slow reply then holds back nothing but itself. The arguments
        // are evaluated a batch at a time, and rows point into their batch.
        let rows = input.flat_map(move |batch| {
            let rows: Vec<Result<(Arc<Arguments>, usize)>> =
                match batch.and_then(|b| Arguments::of(b, &to_call)) {
                    Ok(args) => {
                        let args = Arc::new(args);
                        (0..args.batch.num_rows())
                            .map(|i| Ok((Arc::clone(&args), i)))
                            .collect()
                    }
                    Err(e) => vec![Err(e)],
                };
            futures::stream::iter(rows)
        });
        let out_schema = Arc::clone(&schema);
        let functions: Vec<Arc<LlmFunction>> =
            calls.iter().map(|c| Arc::clone(&c.function)).collect();
        // A row starts only when its roles have room: the window bounds one partition, the
        // roles' budgets every partition and shard of the process together.
        let budgets = Arc::new(row_budgets(&calls));
        let started = rows.then(move |row| {
            let budgets = Arc::clone(&budgets);
            async move {
                let permits = match &row {
                    Ok(_) => start_row(&budgets).await,
                    Err(_) => Vec::new(),
                };
                (row, permits)
            }
        });
        let evaluated = started
            .map(move |(row, permits)| {
                let calls = Arc::clone(&calls);
                async move {
                    let (args, i) = row?;
                    let replies = join_all(
                        calls
                            .iter()
                            .zip(&args.strings)
                            .map(|(call, strings)| call.function.call_at(strings, i)),
                    )
                    .await;
                    drop(permits);
                    Ok(Answered { args, i, replies })
                }
            })
            .buffer_unordered(self.window.rows);
        let evaluated = gathered(Box::pin(evaluated), OUTPUT_BATCH_ROWS, OUTPUT_BATCH_WAIT).map(
            move |ready: Vec<Result<Answered>>| {
                let rows = ready.into_iter().collect::<Result<Vec<_>>>()?;
                assemble(&out_schema, rows, &functions, &call_of)
            },
        );
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, evaluated)))
    }
}

/// Items of `stream` in chunks of at most `most`: a chunk is given when full, `wait` after
/// its first item arrived, or when the stream ends (so the last rows of a stage wait for
/// nothing).
fn gathered<S>(stream: S, most: usize, wait: Duration) -> impl Stream<Item = Vec<S::Item>>
where
    S: Stream + Unpin,
{
    futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        let mut chunk = vec![stream.next().await?];
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        while chunk.len() < most {
            tokio::select! {
                item = stream.next() => match item {
                    Some(item) => chunk.push(item),
                    None => return Some((chunk, None)),
                },
                () = &mut deadline => break,
            }
        }
        Some((chunk, Some(stream)))
    })
}

impl LlmWindowExec {
    /// The calls whose first expressions are `firsts`, bound to the session's LLM functions.
    fn calls(&self, context: &TaskContext, firsts: &[usize]) -> Result<Vec<Call>> {
        let functions = context
            .session_config()
            .get_extension::<LlmFunctions>()
            .ok_or_else(|| internal_datafusion_err!("the session has no LLM functions"))?;
        firsts
            .iter()
            .map(|&i| {
                let Some(expr) = self.exprs[i].func.downcast_ref::<ScalarFunctionExpr>() else {
                    return internal_err!("not a function call: {}", self.exprs[i]);
                };
                let name = expr.fun().name();
                let Some(function) = functions.get(name) else {
                    return internal_err!("{name} is not an LLM function of this session");
                };
                Ok(Call {
                    function,
                    args: expr.args().to_vec(),
                })
            })
            .collect()
    }
}

/// The roles a row of `calls` calls, each once with how many of its calls go to it, ordered
/// by role name: every operator takes its rows' budgets in the same order, so rows waiting
/// for two roles never wait for each other.
fn row_budgets(calls: &[Call]) -> Vec<(Arc<LlmFunction>, usize)> {
    let mut budgets: Vec<(Arc<LlmFunction>, usize)> = Vec::new();
    for call in calls {
        let client = call.function.client();
        match budgets
            .iter_mut()
            .find(|(f, _)| f.client().same_rows(client))
        {
            Some((_, n)) => *n += 1,
            None => budgets.push((Arc::clone(&call.function), 1)),
        }
    }
    budgets.sort_by(|(a, _), (b, _)| a.client().spec().role.cmp(&b.client().spec().role));
    budgets
}

/// Waits until every role of `budgets` has room for one more row.
async fn start_row(budgets: &[(Arc<LlmFunction>, usize)]) -> Vec<OwnedSemaphorePermit> {
    let mut permits = Vec::with_capacity(budgets.len());
    for (function, n) in budgets {
        permits.push(function.client().start_rows(*n).await);
    }
    permits
}

/// One distinct LLM call of the operator: the function and its argument expressions.
struct Call {
    function: Arc<LlmFunction>,
    args: Vec<Arc<dyn PhysicalExpr>>,
}

/// An input batch and, per call, its arguments as strings.
struct Arguments {
    batch: RecordBatch,
    strings: Vec<Vec<StringArray>>,
}

impl Arguments {
    fn of(batch: RecordBatch, calls: &[Call]) -> Result<Self> {
        let n = batch.num_rows();
        let strings = calls
            .iter()
            .map(|call| {
                let values = call
                    .args
                    .iter()
                    .map(|e| e.evaluate(&batch))
                    .collect::<Result<Vec<_>>>()?;
                string_columns(&values, n)
            })
            .collect::<Result<_>>()?;
        Ok(Self { batch, strings })
    }
}

/// Row `i` of `args` with the answers of its distinct calls.
struct Answered {
    args: Arc<Arguments>,
    i: usize,
    replies: Vec<Option<Vec<Sample>>>,
}

/// The output batch of `rows`: their input columns gathered from their batches, then one
/// reply column per expression, `call_of` naming the call (of `functions`) whose replies it
/// shows.
fn assemble(
    schema: &SchemaRef,
    rows: Vec<Answered>,
    functions: &[Arc<LlmFunction>],
    call_of: &[usize],
) -> Result<RecordBatch> {
    let mut batches: Vec<&RecordBatch> = Vec::new();
    let mut indices = Vec::with_capacity(rows.len());
    for row in &rows {
        let b = match batches
            .iter()
            .position(|b| std::ptr::eq(*b, &row.args.batch))
        {
            Some(b) => b,
            None => {
                batches.push(&row.args.batch);
                batches.len() - 1
            }
        };
        indices.push((b, row.i));
    }
    let width = batches.first().map_or(0, |b| b.num_columns());
    let mut columns = (0..width)
        .map(|c| {
            let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
            Ok(interleave(&arrays, &indices)?)
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    drop(batches);
    let distinct = rows.first().map_or(0, |r| r.replies.len());
    let mut replies: Vec<Vec<Option<Vec<Sample>>>> = (0..distinct)
        .map(|_| Vec::with_capacity(rows.len()))
        .collect();
    for row in rows {
        for (j, reply) in row.replies.into_iter().enumerate() {
            replies[j].push(reply);
        }
    }
    let arrays: Vec<ArrayRef> = replies
        .into_iter()
        .zip(functions)
        .map(|(answers, function)| function.answers_to_array(answers))
        .collect();
    columns.extend(call_of.iter().map(|&j| Arc::clone(&arrays[j])));
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}
