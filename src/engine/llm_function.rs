//! LLM functions as async UDFs: each renders its prompt template per row and calls its model
//! role; the reply is a struct column (text, usage, error, ...) so nothing the server said is
//! lost and parsers can run again on stored replies.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringArray,
    StringBuilder, StructArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::not_impl_err;
use datafusion::error::Result;
use datafusion::logical_expr::async_udf::AsyncScalarUDFImpl;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};
use futures::future::join_all;

use crate::engine::args::string_columns;
use crate::error::Error;
use crate::job::FunctionSpec;
use crate::llm::client::ModelClient;
use crate::llm::journal::JournalScope;
use crate::llm::reply::{Reply, Request};
use crate::parse::logprob_score;

/// The struct every LLM function returns.
pub fn llm_reply_type() -> DataType {
    DataType::Struct(llm_reply_fields())
}

fn llm_reply_fields() -> Fields {
    static FIELDS: std::sync::LazyLock<Fields> = std::sync::LazyLock::new(reply_fields);
    FIELDS.clone()
}

fn reply_fields() -> Fields {
    Fields::from(vec![
        Field::new("text", DataType::Utf8, true),
        Field::new("finish_reason", DataType::Utf8, true),
        Field::new("prompt_tokens", DataType::Int64, true),
        Field::new("completion_tokens", DataType::Int64, true),
        Field::new("latency_ms", DataType::Int64, true),
        Field::new("attempts", DataType::Int32, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("cached", DataType::Boolean, true),
        Field::new("cost_usd", DataType::Float64, true),
        Field::new("top_logprobs", DataType::Utf8, true),
        Field::new("reasoning", DataType::Utf8, true),
        Field::new("reasoning_tokens", DataType::Int64, true),
        Field::new("cached_tokens", DataType::Int64, true),
    ])
}

/// The LLM functions of a session by name, kept in its config so that
/// [`LlmWindowExec`](crate::engine::window::LlmWindowExec) calls them row by row.
#[derive(Debug, Default)]
pub struct LlmFunctions(HashMap<String, Arc<LlmFunction>>);

impl LlmFunctions {
    /// Adds `function` under its SQL name.
    pub fn insert(&mut self, function: Arc<LlmFunction>) {
        self.0.insert(function.spec.name.clone(), function);
    }

    /// The function called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LlmFunction>> {
        self.0.get(name).cloned()
    }
}

/// An LLM function: renders its template for each row and calls its model role.
#[derive(Debug)]
pub struct LlmFunction {
    spec: FunctionSpec,
    client: ModelClient,
    journal: Arc<JournalScope>,
    templates: minijinja::Environment<'static>,
    signature: Signature,
}

impl PartialEq for LlmFunction {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl Eq for LlmFunction {}

impl std::hash::Hash for LlmFunction {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.spec.name.hash(state);
    }
}

impl LlmFunction {
    /// Binds `spec` to `client`, answering from and recording in `journal`, checking that
    /// the template parses.
    pub fn new(
        spec: FunctionSpec,
        client: ModelClient,
        journal: Arc<JournalScope>,
    ) -> crate::error::Result<Self> {
        let mut templates = minijinja::Environment::new();
        templates.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        templates
            .add_template_owned("prompt", spec.template.clone())
            .map_err(|e| Error::Job(format!("template of {}: {e}", spec.name)))?;
        if let Some((fallback, _)) = &spec.fallback {
            templates
                .add_template_owned("fallback", fallback.clone())
                .map_err(|e| Error::Job(format!("fallback template of {}: {e}", spec.name)))?;
        }
        Ok(Self {
            templates,
            // Not `user_defined`: DataFusion's async wrapper does not forward `coerce_types`.
            signature: Signature::string(spec.args.len(), Volatility::Volatile),
            spec,
            client,
            journal,
        })
    }

    fn render(&self, template: &str, values: &[&str]) -> std::result::Result<String, String> {
        let ctx: BTreeMap<&str, String> = self
            .spec
            .args
            .iter()
            .map(String::as_str)
            .zip(values.iter().map(|v| v.to_string()))
            .collect();
        self.templates
            .get_template(template)
            .and_then(|t| t.render(ctx))
            .map_err(|e| format!("template: {e}"))
    }

    /// The reply for row `i` of `args` (one string column per argument); `None`, and no
    /// request, when an argument is NULL.
    pub async fn call_at(&self, args: &[StringArray], i: usize) -> Option<Reply> {
        let values: Option<Vec<&str>> = args
            .iter()
            .map(|c| (!c.is_null(i)).then(|| c.value(i)))
            .collect();
        Some(self.call_row(values?).await)
    }

    async fn call_row(&self, values: Vec<&str>) -> Reply {
        let first = self
            .ask(
                "prompt",
                &values,
                self.spec.max_tokens,
                self.spec.logprobs.then_some(20),
            )
            .await;
        let Some((_, max_tokens)) = &self.spec.fallback else {
            return first;
        };
        let has_digit = first
            .top_logprobs
            .as_deref()
            .and_then(logprob_score)
            .is_some();
        if first.error.is_some() || has_digit {
            return first;
        }
        // No digit among the likely first tokens: ask for the text judgement instead, and
        // keep the first reply's alternatives so the row shows why.
        let text = self.ask("fallback", &values, *max_tokens, None).await;
        Reply {
            top_logprobs: first.top_logprobs,
            attempts: first.attempts + text.attempts,
            prompt_tokens: Some(first.prompt_tokens.unwrap_or(0) + text.prompt_tokens.unwrap_or(0)),
            completion_tokens: Some(
                first.completion_tokens.unwrap_or(0) + text.completion_tokens.unwrap_or(0),
            ),
            cost_usd: first.cost_usd + text.cost_usd,
            latency_ms: first.latency_ms + text.latency_ms,
            cached: first.cached && text.cached,
            ..text
        }
    }

    async fn ask(
        &self,
        template: &str,
        values: &[&str],
        max_tokens: u32,
        top_logprobs: Option<u32>,
    ) -> Reply {
        match self.render(template, values) {
            Ok(prompt) => {
                self.client
                    .call(
                        Request {
                            mock: self.spec.mock,
                            prompt,
                            system: self.spec.system.clone(),
                            max_tokens,
                            top_logprobs,
                        },
                        &self.journal,
                    )
                    .await
            }
            Err(error) => Reply {
                error: Some(error),
                ..Reply::default()
            },
        }
    }
}

impl ScalarUDFImpl for LlmFunction {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(llm_reply_type())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        not_impl_err!(
            "{} calls an LLM and runs only asynchronously",
            self.spec.name
        )
    }
}

#[async_trait]
impl AsyncScalarUDFImpl for LlmFunction {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let columns = string_columns(&args.args, args.number_rows)?;
        // Every row of the batch is started at once; the endpoint's slots bound what is on the
        // wire.
        let replies = join_all((0..args.number_rows).map(|i| self.call_at(&columns, i))).await;
        Ok(ColumnarValue::Array(replies_to_array(replies)))
    }
}

/// Builds the reply struct column; `None` rows are NULL.
pub fn replies_to_array(replies: Vec<Option<Reply>>) -> ArrayRef {
    let n = replies.len();
    let mut text = StringBuilder::with_capacity(n, 0);
    let mut finish = StringBuilder::with_capacity(n, 0);
    let mut prompt_tokens = Int64Builder::with_capacity(n);
    let mut completion_tokens = Int64Builder::with_capacity(n);
    let mut latency = Int64Builder::with_capacity(n);
    let mut attempts = Int32Builder::with_capacity(n);
    let mut error = StringBuilder::with_capacity(n, 0);
    let mut cached = BooleanBuilder::with_capacity(n);
    let mut cost = Float64Builder::with_capacity(n);
    let mut top = StringBuilder::with_capacity(n, 0);
    let mut reasoning = StringBuilder::with_capacity(n, 0);
    let mut reasoning_tokens = Int64Builder::with_capacity(n);
    let mut cached_tokens = Int64Builder::with_capacity(n);
    let nulls = replies.iter().map(Option::is_some).collect::<Vec<bool>>();
    for reply in replies {
        let Some(r) = reply else {
            for column in [&mut text, &mut finish, &mut error, &mut top, &mut reasoning] {
                column.append_null();
            }
            for column in [
                &mut prompt_tokens,
                &mut completion_tokens,
                &mut reasoning_tokens,
                &mut cached_tokens,
            ] {
                column.append_null();
            }
            latency.append_null();
            attempts.append_null();
            cached.append_null();
            cost.append_null();
            continue;
        };
        text.append_option(r.text);
        finish.append_option(r.finish_reason);
        prompt_tokens.append_option(r.prompt_tokens);
        completion_tokens.append_option(r.completion_tokens);
        latency.append_value(r.latency_ms);
        attempts.append_value(r.attempts);
        error.append_option(r.error);
        cached.append_value(r.cached);
        cost.append_value(r.cost_usd);
        top.append_option(r.top_logprobs);
        reasoning.append_option(r.reasoning);
        reasoning_tokens.append_option(r.reasoning_tokens);
        cached_tokens.append_option(r.cached_tokens);
    }
    let fields = llm_reply_fields();
    Arc::new(StructArray::new(
        fields,
        vec![
            Arc::new(text.finish()),
            Arc::new(finish.finish()),
            Arc::new(prompt_tokens.finish()),
            Arc::new(completion_tokens.finish()),
            Arc::new(latency.finish()),
            Arc::new(attempts.finish()),
            Arc::new(error.finish()),
            Arc::new(cached.finish()),
            Arc::new(cost.finish()),
            Arc::new(top.finish()),
            Arc::new(reasoning.finish()),
            Arc::new(reasoning_tokens.finish()),
            Arc::new(cached_tokens.finish()),
        ],
        Some(nulls.into()),
    ))
}
