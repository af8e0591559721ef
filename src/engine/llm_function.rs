//! LLM functions as async UDFs: each renders its prompt template per row and calls its model
//! role; the reply is a struct column (text, usage, error, ...) so nothing the server said is
//! lost and parsers can run again on stored replies.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, ListArray,
    StringArray, StringBuilder, StructArray,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
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
use crate::job::schema::json_array;
use crate::llm::client::ModelClient;
use crate::llm::journal::JournalScope;
use crate::llm::reply::{Reply, Request, Turn};
use crate::parse::{is_refusal, weighed_score};

/// The calls of a column an LLM function made: the column itself when it is a call struct
/// (a reply, with or without a schema's `json` after its fields), its values when it is a list
/// of them (several samples), with the range of its rows the column holds (a slice of a list
/// shares its parent's values); `None` for any other column.
pub fn call_structs(column: &ArrayRef) -> Option<(&StructArray, std::ops::Range<usize>)> {
    let (calls, rows) = match column.data_type() {
        DataType::Struct(_) => {
            let calls = column.as_any().downcast_ref::<StructArray>()?;
            (calls, 0..calls.len())
        }
        DataType::List(_) => {
            let list = column.as_any().downcast_ref::<ListArray>()?;
            let offsets = list.value_offsets();
            let rows = offsets[0] as usize..offsets[offsets.len() - 1] as usize;
            (list.values().as_any().downcast_ref::<StructArray>()?, rows)
        }
        _ => return None,
    };
    let fields = llm_reply_fields();
    let is_call = calls.fields().len() >= fields.len()
        && calls
            .fields()
            .iter()
            .zip(fields.iter())
            .all(|(a, b)| a == b);
    is_call.then_some((calls, rows))
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
    /// The fields of one sample's struct: the call's, then `json` typed by the schema.
    sample_fields: Fields,
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
        let sample_fields = match &spec.schema {
            Some(schema) => {
                let mut fields: Vec<Field> = llm_reply_fields()
                    .iter()
                    .map(|f| f.as_ref().clone())
                    .collect();
                fields.push(Field::new(JSON_FIELD, schema.arrow_type(), true));
                Fields::from(fields)
            }
            None => llm_reply_fields(),
        };
        Ok(Self {
            templates,
            // Not `user_defined`: DataFusion's async wrapper does not forward `coerce_types`.
            signature: Signature::string(spec.args.len(), Volatility::Volatile),
            sample_fields,
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

    /// The model role the function calls.
    pub fn client(&self) -> &ModelClient {
        &self.client
    }

    /// The reply struct this function returns: the call's fields, then `json` (the reply's
    /// value, typed by the schema) when it has one; a list of them when it asks for several
    /// samples.
    pub fn reply_type(&self) -> DataType {
        let one = DataType::Struct(self.sample_fields.clone());
        if self.spec.samples > 1 {
            DataType::List(Arc::new(Field::new("item", one, true)))
        } else {
            one
        }
    }

    /// The answer for row `i` of `args` (one string column per argument), one sample per
    /// sample asked; `None`, and no request, when an argument is NULL.
    pub async fn call_at(&self, args: &[StringArray], i: usize) -> Option<Vec<Sample>> {
        let values: Option<Vec<&str>> = args
            .iter()
            .map(|c| (!c.is_null(i)).then(|| c.value(i)))
            .collect();
        Some(self.call_row(values?).await)
    }

    async fn call_row(&self, values: Vec<&str>) -> Vec<Sample> {
        let samples = self.spec.samples;
        if samples <= 1 {
            return vec![self.call_once(&values).await];
        }
        let request = match self.request("prompt", &values, self.spec.max_tokens, None) {
            Ok(request) => request,
            Err(reply) => return vec![Sample::of(reply); samples as usize],
        };
        // Kept only where a retry needs it, as in `call_once`.
        let retried = self.spec.schema.is_some().then(|| request.clone());
        let asked = Request {
            choices: samples,
            ..request
        };
        let replies = self.client.call_choices(asked, &self.journal).await;
        let Some(request) = retried else {
            return replies.into_iter().map(Sample::of).collect();
        };
        let checked = replies
            .into_iter()
            .zip(0..)
            .map(|(reply, i)| self.checked(reply, request.sample(i)));
        join_all(checked).await
    }

    async fn call_once(&self, values: &[&str]) -> Sample {
        // A server found to lack logprobs is asked for the text judgement straight away.
        if self.spec.logprobs
            && self.client.lacks("logprobs")
            && let Some((_, max_tokens)) = &self.spec.fallback
        {
            return Sample::of(self.text_judgement(values, *max_tokens).await);
        }
        let top_logprobs = self.spec.logprobs.then_some(20);
        let request = match self.request("prompt", values, self.spec.max_tokens, top_logprobs) {
            Ok(request) => request,
            Err(reply) => return Sample::of(reply),
        };
        // Kept only where a retry needs it: every row in flight would hold a second prompt.
        let retried = self.spec.schema.is_some().then(|| request.clone());
        let first = self.client.call(request, &self.journal).await;
        if let Some(request) = retried {
            return self.checked(first, request).await;
        }
        let Some((_, max_tokens)) = &self.spec.fallback else {
            return Sample::of(first);
        };
        let has_digit = first
            .top_logprobs
            .as_deref()
            .and_then(weighed_score)
            .is_some();
        if first.error.is_some() || has_digit || is_refusal(first.finish_reason.as_deref()) {
            return Sample::of(first);
        }
        // No digit holding most of the first token's probability: ask for the text
        // judgement instead, and
        // keep the first reply's alternatives so the row shows why.
        let text = self.text_judgement(values, *max_tokens).await;
        let top_logprobs = first.top_logprobs.clone();
        Sample::of(Reply {
            top_logprobs,
            ..first.followed_by(text)
        })
    }

    /// The fallback text judgement of a logprob score, or the error of building it.
    async fn text_judgement(&self, values: &[&str], max_tokens: u32) -> Reply {
        match self.request("fallback", values, max_tokens, None) {
            Ok(fallback) => self.client.call(fallback, &self.journal).await,
            Err(reply) => reply,
        }
    }

    /// `reply` (to `request`) held to the function's schema: a reply off it is asked again,
    /// with what is wrong, up to `schema_retries` times, then an error value saying why.
    async fn checked(&self, mut reply: Reply, mut request: Request) -> Sample {
        let Some(schema) = &self.spec.schema else {
            return Sample::of(reply);
        };
        loop {
            // A refusal is the model's answer: asking again would pay for it again.
            if reply.error.is_some() || is_refusal(reply.finish_reason.as_deref()) {
                return Sample::of(reply);
            }
            let text = reply.text.clone().unwrap_or_default();
            let why = match schema.check(&text) {
                Ok(value) => {
                    return Sample {
                        reply,
                        value: Some(value),
                    };
                }
                Err(why) => why,
            };
            // Cut off by the token limit: asked again it would be cut again, each retry's
            // prompt longer by the reply sent back. It stands, read as truncated.
            if crate::parse::cut_by_limit(reply.finish_reason.as_deref()).is_some() {
                return Sample::of(reply);
            }
            if request.turns.len() >= self.spec.schema_retries as usize {
                let replies = request.turns.len() + 1;
                reply.error = Some(format!(
                    "no reply followed the JSON schema in {replies} tries; the last: {why}"
                ));
                return Sample::of(reply);
            }
            request.turns.push(Turn {
                reply: text,
                feedback: format!(
                    "That reply does not follow the required JSON schema: {why}. Reply again \
                     with only the JSON object."
                ),
            });
            let next = self.client.call(request.clone(), &self.journal).await;
            reply = reply.followed_by(next);
        }
    }

    /// The request of `template` for a row's `values`, or the error reply of a template that
    /// would not render.
    fn request(
        &self,
        template: &str,
        values: &[&str],
        max_tokens: u32,
        top_logprobs: Option<u32>,
    ) -> std::result::Result<Request, Reply> {
        let prompt = self.render(template, values).map_err(|error| Reply {
            error: Some(error),
            ..Reply::default()
        })?;
        Ok(Request {
            mock: self.spec.mock,
            prompt,
            system: self.spec.system.clone(),
            max_tokens,
            top_logprobs,
            schema: self.spec.schema.clone(),
            turns: Vec::new(),
            sample: None,
            choices: 1,
        })
    }

    /// The column of `answers`, as [`LlmFunction::reply_type`] says; `None` rows are NULL.
    pub fn answers_to_array(&self, answers: Vec<Option<Vec<Sample>>>) -> ArrayRef {
        if self.spec.samples <= 1 {
            let rows = answers
                .into_iter()
                .map(|a| a.and_then(|mut samples| samples.pop()))
                .collect();
            return Arc::new(self.samples_to_struct(rows));
        }
        let lengths: Vec<usize> = answers
            .iter()
            .map(|a| a.as_ref().map_or(0, Vec::len))
            .collect();
        let nulls = NullBuffer::from(answers.iter().map(Option::is_some).collect::<Vec<_>>());
        let flat: Vec<Option<Sample>> = answers.into_iter().flatten().flatten().map(Some).collect();
        let item = Arc::new(Field::new(
            "item",
            DataType::Struct(self.sample_fields.clone()),
            true,
        ));
        Arc::new(ListArray::new(
            item,
            OffsetBuffer::from_lengths(lengths),
            Arc::new(self.samples_to_struct(flat)),
            Some(nulls),
        ))
    }

    fn samples_to_struct(&self, samples: Vec<Option<Sample>>) -> StructArray {
        let (replies, values): (Vec<Option<Reply>>, Vec<Option<serde_json::Value>>) = samples
            .into_iter()
            .map(|s| match s {
                Some(s) => (Some(s.reply), s.value),
                None => (None, None),
            })
            .unzip();
        let calls = replies_to_struct(replies);
        let Some(json) = self.sample_fields.find(JSON_FIELD).map(|(_, f)| f) else {
            return calls;
        };
        let (_, mut columns, nulls) = calls.into_parts();
        let refs: Vec<Option<&serde_json::Value>> = values.iter().map(Option::as_ref).collect();
        columns.push(json_array(json.data_type(), &refs));
        StructArray::new(self.sample_fields.clone(), columns, nulls)
    }
}

/// The field of a schema function's reply struct holding the reply's value.
pub const JSON_FIELD: &str = "json";

/// One sample of a row's answer: the call's reply and, for a function with a schema, the
/// reply's value.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The call, retries and follow-ups included.
    pub reply: Reply,
    /// The reply's JSON value when it followed the schema.
    pub value: Option<serde_json::Value>,
}

impl Sample {
    fn of(reply: Reply) -> Self {
        Self { reply, value: None }
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
        Ok(self.reply_type())
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
        let answers = join_all((0..args.number_rows).map(|i| self.call_at(&columns, i))).await;
        Ok(ColumnarValue::Array(self.answers_to_array(answers)))
    }
}

/// The call struct of `replies`; `None` rows are NULL.
fn replies_to_struct(replies: Vec<Option<Reply>>) -> StructArray {
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
    StructArray::new(
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
    )
}
