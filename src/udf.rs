//! All glue to DataFusion's UDF traits. The async UDF API changed in every release since it
//! arrived (49); DataFusion is pinned and this is the only module that implements its traits.
//!
//! LLM functions are `Volatile` async UDFs returning an [`llm_reply_type`] struct; parsers and
//! prepare helpers are plain scalar UDFs, so thresholds and parsers can be re-run on stored raw
//! outputs without calling an LLM again.

use std::borrow::Cow;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Array, Int64Builder,
    ListArray, StringArray, StringBuilder, StructArray,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::{ScalarValue, exec_err, not_impl_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use futures::future::join_all;

use crate::job::FunctionSpec;
use crate::llm::{ModelClient, Reply, Request};
use crate::minhash::NearDedup;
use crate::quality::QualityRules;
use crate::text::{self, CandidateMode, UnitRules};
use crate::tokens::TokenCounter;

/// The struct every LLM function returns.
pub fn llm_reply_type() -> DataType {
    DataType::Struct(Fields::from(vec![
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
    ]))
}

fn unit_type() -> DataType {
    DataType::Struct(Fields::from(vec![
        Field::new("ordinal", DataType::Int64, false),
        Field::new("header", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, false),
        Field::new("drop", DataType::Utf8, true),
    ]))
}

fn parsed_score_type() -> DataType {
    DataType::Struct(Fields::from(vec![
        Field::new("score", DataType::Int64, true),
        Field::new("reason", DataType::Utf8, true),
    ]))
}

/// Registers every backforth function in `ctx`: the LLM functions bound to their clients, the
/// parsers, and the prepare helpers using `tokens` for `token_count` and `rules` for the
/// quality rules and MinHash signatures.
pub fn register_all(
    ctx: &SessionContext,
    functions: &[(FunctionSpec, ModelClient)],
    tokens: TokenCounter,
    rules: PrepareRules,
) -> crate::error::Result<()> {
    for (spec, client) in functions {
        let udf = LlmFunction::new(spec.clone(), client.clone())?;
        ctx.register_udf(AsyncScalarUDF::new(Arc::new(udf)).into_scalar_udf());
    }
    for udf in scalar_udfs(tokens, rules) {
        ctx.register_udf(udf);
    }
    Ok(())
}

/// The job's settings behind `clean_document`, `quality_problem` and `minhash`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PrepareRules {
    /// Quality rules.
    pub quality: QualityRules,
    /// MinHash parameters (the defaults when the job sets none).
    pub near_dedup: NearDedup,
}

/// The pure (non-LLM) functions.
pub fn scalar_udfs(tokens: TokenCounter, rules: PrepareRules) -> Vec<ScalarUDF> {
    let rules = Arc::new(rules);
    vec![
        ScalarUDF::new_from_impl(Prepare::new(PrepareKind::CleanDocument, &rules)),
        ScalarUDF::new_from_impl(Prepare::new(PrepareKind::QualityProblem, &rules)),
        ScalarUDF::new_from_impl(Prepare::new(PrepareKind::MinHash, &rules)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::ParseScore)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::ExtractTagged)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::TagProblem)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::CleanInstruction)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::DedupKey)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::CandidateUnits)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::DocumentUnit)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::LogprobScore)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::WordTrigrams)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::TrigramOverlap)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::JudgeScore)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::ParseVerdict)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::RefusalPhrase)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::SelfReferencePhrase)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::SourceReferencePhrase)),
        ScalarUDF::new_from_impl(Pure::new(PureKind::MaxRepeats)),
        ScalarUDF::new_from_impl(TokenCount::new(tokens)),
    ]
}

/// An LLM function: renders its template for each row and calls its model role.
#[derive(Debug)]
pub struct LlmFunction {
    spec: FunctionSpec,
    client: ModelClient,
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
    /// Binds `spec` to `client`, checking that the template parses.
    pub fn new(spec: FunctionSpec, client: ModelClient) -> crate::error::Result<Self> {
        let mut templates = minijinja::Environment::new();
        templates.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        templates
            .add_template_owned("prompt", spec.template.clone())
            .map_err(|e| crate::error::Error::Job(format!("template of {}: {e}", spec.name)))?;
        if let Some((fallback, _)) = &spec.fallback {
            templates
                .add_template_owned("fallback", fallback.clone())
                .map_err(|e| {
                    crate::error::Error::Job(format!("fallback template of {}: {e}", spec.name))
                })?;
        }
        Ok(Self {
            templates,
            // Not `user_defined`: DataFusion's async wrapper does not forward `coerce_types`.
            signature: Signature::string(spec.args.len(), Volatility::Volatile),
            spec,
            client,
        })
    }

    fn render(&self, template: &str, values: &[&str]) -> std::result::Result<String, String> {
        let ctx: std::collections::BTreeMap<&str, String> = self
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
            .and_then(text::logprob_score)
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
                    .call(Request {
                        task: self
                            .spec
                            .builtin
                            .clone()
                            .unwrap_or_else(|| self.spec.name.clone()),
                        prompt,
                        system: self.spec.system.clone(),
                        max_tokens,
                        top_logprobs,
                    })
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
        let n = args.number_rows;
        let columns = string_columns(&args.args, n)?;
        let rows = (0..n).map(|i| {
            let values: Option<Vec<&str>> = columns
                .iter()
                .map(|c| (!c.is_null(i)).then(|| c.value(i)))
                .collect();
            async move {
                match values {
                    // A row with a NULL argument has nothing to ask; no request is sent.
                    None => None,
                    Some(values) => Some(self.call_row(values).await),
                }
            }
        });
        // Every row of the batch is started at once; the endpoint's slots bound what is on the
        // wire, and LlmWindowExec keeps several batches in flight so no batch waits alone.
        let replies = join_all(rows).await;
        Ok(ColumnarValue::Array(replies_to_array(&replies)))
    }
}

fn string_columns(args: &[ColumnarValue], n: usize) -> Result<Vec<StringArray>> {
    args.iter()
        .map(|a| {
            let array = cast(&a.to_array(n)?, &DataType::Utf8)?;
            Ok(array
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("cast to Utf8 gives a StringArray")
                .clone())
        })
        .collect()
}

fn coerce_strings(name: &str, params: &[&str], arg_types: &[DataType]) -> Result<Vec<DataType>> {
    if arg_types.len() != params.len() {
        return plan_err!(
            "{name}({}) takes {} argument(s), got {}",
            params.join(", "),
            params.len(),
            arg_types.len()
        );
    }
    arg_types
        .iter()
        .zip(params)
        .map(|(t, p)| match t {
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 | DataType::Null => {
                Ok(DataType::Utf8)
            }
            other => plan_err!("{name}: argument {p} must be a string, got {other}"),
        })
        .collect()
}

/// Builds the reply struct column; `None` rows are NULL.
pub fn replies_to_array(replies: &[Option<Reply>]) -> ArrayRef {
    let n = replies.len();
    let mut text = StringBuilder::new();
    let mut finish = StringBuilder::new();
    let mut prompt_tokens = Int64Builder::with_capacity(n);
    let mut completion_tokens = Int64Builder::with_capacity(n);
    let mut latency = Int64Builder::with_capacity(n);
    let mut attempts = Int32Builder::with_capacity(n);
    let mut error = StringBuilder::new();
    let mut cached = BooleanBuilder::with_capacity(n);
    let mut cost = Float64Builder::with_capacity(n);
    let mut top = StringBuilder::new();
    for reply in replies {
        let r = reply.clone().unwrap_or_default();
        text.append_option(r.text);
        finish.append_option(r.finish_reason);
        prompt_tokens.append_option(r.prompt_tokens);
        completion_tokens.append_option(r.completion_tokens);
        latency.append_option(reply.as_ref().map(|r| r.latency_ms));
        attempts.append_option(reply.as_ref().map(|r| r.attempts));
        error.append_option(r.error);
        cached.append_option(reply.as_ref().map(|r| r.cached));
        cost.append_option(reply.as_ref().map(|r| r.cost_usd));
        top.append_option(r.top_logprobs);
    }
    let DataType::Struct(fields) = llm_reply_type() else {
        unreachable!("llm_reply_type is a struct")
    };
    let nulls = replies.iter().map(Option::is_some).collect::<Vec<bool>>();
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
        ],
        Some(nulls.into()),
    ))
}

/// The pure string functions, one struct for all since they share argument handling.
#[derive(Debug, PartialEq, Eq, Hash, Clone, Copy)]
enum PureKind {
    /// `parse_score(raw [, finish_reason])` -> struct(score, reason)
    ParseScore,
    /// `extract_tagged(raw, tag)` -> text between `[tag]` and `[/tag]`
    ExtractTagged,
    /// `tag_problem(raw, tag [, finish_reason])` -> why extract_tagged found nothing
    TagProblem,
    /// `clean_instruction(raw)` -> instruction without labels and quotes
    CleanInstruction,
    /// `dedup_key(text)` -> hash of the normalised text
    DedupKey,
    /// `candidate_units(text, mode, min_chars, max_chars, repeat_jaccard)` -> list of units
    CandidateUnits,
    /// `document_unit(text, min_chars, max_chars)` -> the whole document as one unit
    DocumentUnit,
    /// `logprob_score(top_logprobs)` -> struct(expected, mass) over the digits 1-5
    LogprobScore,
    /// `word_trigrams(text)` -> list of the text's word trigrams
    WordTrigrams,
    /// `trigram_overlap(text, reference)` -> share of the text's word trigrams in the reference
    TrigramOverlap,
    /// `judge_score(text, finish_reason, error, top_logprobs)` -> struct(score, reason,
    /// expected, mass, source) from a scoring reply in either mode
    JudgeScore,
    /// `parse_verdict(raw [, finish_reason])` -> struct(verdict, reason): good/bad
    ParseVerdict,
    /// `refusal_phrase(text)` -> the refusal or apology phrase found, or NULL
    RefusalPhrase,
    /// `self_reference_phrase(text)` -> "the text", "as an AI", ... found, or NULL
    SelfReferencePhrase,
    /// `source_reference_phrase(text)` -> "the article", "according to", ... found, or NULL
    SourceReferencePhrase,
    /// `max_repeats(text [, max_period])` -> copies in the longest back-to-back repeat of a
    /// word sequence (up to `max_period` words, default 50)
    MaxRepeats,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Pure {
    kind: PureKind,
    signature: Signature,
}

impl Pure {
    fn new(kind: PureKind) -> Self {
        Self {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }

    /// (name, required parameters, optional trailing parameters)
    fn params(
        &self,
    ) -> (
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    ) {
        match self.kind {
            PureKind::ParseScore => ("parse_score", &["raw"], &["finish_reason"]),
            PureKind::ExtractTagged => ("extract_tagged", &["raw", "tag"], &[]),
            PureKind::TagProblem => ("tag_problem", &["raw", "tag"], &["finish_reason"]),
            PureKind::CleanInstruction => ("clean_instruction", &["raw"], &[]),
            PureKind::DedupKey => ("dedup_key", &["text"], &[]),
            PureKind::LogprobScore => ("logprob_score", &["top_logprobs"], &[]),
            PureKind::WordTrigrams => ("word_trigrams", &["text"], &[]),
            PureKind::TrigramOverlap => ("trigram_overlap", &["text", "reference"], &[]),
            PureKind::JudgeScore => (
                "judge_score",
                &["text", "finish_reason", "error", "top_logprobs"],
                &[],
            ),
            PureKind::ParseVerdict => ("parse_verdict", &["raw"], &["finish_reason"]),
            PureKind::RefusalPhrase => ("refusal_phrase", &["text"], &[]),
            PureKind::SelfReferencePhrase => ("self_reference_phrase", &["text"], &[]),
            PureKind::SourceReferencePhrase => ("source_reference_phrase", &["text"], &[]),
            PureKind::MaxRepeats => ("max_repeats", &["text"], &["max_period"]),
            PureKind::CandidateUnits => (
                "candidate_units",
                &["text", "mode", "min_chars", "max_chars", "repeat_jaccard"],
                &[],
            ),
            PureKind::DocumentUnit => ("document_unit", &["text", "min_chars", "max_chars"], &[]),
        }
    }
}

impl ScalarUDFImpl for Pure {
    fn name(&self) -> &str {
        self.params().0
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let (name, required, optional) = self.params();
        if arg_types.len() < required.len() || arg_types.len() > required.len() + optional.len() {
            let all: Vec<&str> = required.iter().chain(optional.iter()).copied().collect();
            return plan_err!(
                "{name}({}) got {} argument(s)",
                all.join(", "),
                arg_types.len()
            );
        }
        if self.kind == PureKind::MaxRepeats {
            let mut types = coerce_strings(name, &required[..1], &arg_types[..1])?;
            types.extend(arg_types[1..].iter().map(|_| DataType::Int64));
            return Ok(types);
        }
        if self.kind == PureKind::CandidateUnits {
            return Ok(vec![
                DataType::Utf8,
                DataType::Utf8,
                DataType::Int64,
                DataType::Int64,
                DataType::Float64,
            ]);
        }
        if self.kind == PureKind::DocumentUnit {
            return Ok(vec![DataType::Utf8, DataType::Int64, DataType::Int64]);
        }
        let names: Vec<&str> = required.iter().chain(optional.iter()).copied().collect();
        coerce_strings(name, &names[..arg_types.len()], arg_types)
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            PureKind::ParseScore => parsed_score_type(),
            PureKind::WordTrigrams => {
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
            }
            PureKind::TrigramOverlap => DataType::Float64,
            PureKind::LogprobScore => DataType::Struct(Fields::from(vec![
                Field::new("expected", DataType::Float64, true),
                Field::new("mass", DataType::Float64, true),
            ])),
            PureKind::CandidateUnits => {
                DataType::List(Arc::new(Field::new("item", unit_type(), true)))
            }
            PureKind::DocumentUnit => unit_type(),
            PureKind::JudgeScore => judge_score_type(),
            PureKind::ParseVerdict => verdict_type(),
            PureKind::MaxRepeats => DataType::Int64,
            _ => DataType::Utf8,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        if self.kind == PureKind::CandidateUnits {
            return candidate_units(&args.args, n);
        }
        if self.kind == PureKind::DocumentUnit {
            return document_unit(&args.args, n);
        }
        if self.kind == PureKind::MaxRepeats {
            return max_repeats(&args.args, n);
        }
        let cols = string_columns(&args.args, n)?;
        let get = |c: usize, i: usize| {
            cols.get(c)
                .and_then(|a| (!a.is_null(i)).then(|| a.value(i)))
        };
        let array: ArrayRef = match self.kind {
            PureKind::ParseScore => {
                let mut score = Int64Builder::with_capacity(n);
                let mut reason = StringBuilder::new();
                for i in 0..n {
                    let parsed = text::parse_score(get(0, i), get(1, i));
                    score.append_option(parsed.score);
                    reason.append_option(parsed.reason);
                }
                let DataType::Struct(fields) = parsed_score_type() else {
                    unreachable!("a struct")
                };
                Arc::new(StructArray::new(
                    fields,
                    vec![Arc::new(score.finish()), Arc::new(reason.finish())],
                    None,
                ))
            }
            PureKind::ExtractTagged => Arc::new(
                (0..n)
                    .map(|i| text::extract_tagged(get(0, i)?, get(1, i)?))
                    .collect::<StringArray>(),
            ),
            PureKind::TagProblem => Arc::new(
                (0..n)
                    .map(|i| text::tag_problem(get(0, i), get(1, i).unwrap_or("RES"), get(2, i)))
                    .collect::<StringArray>(),
            ),
            PureKind::CleanInstruction => Arc::new(
                (0..n)
                    .map(|i| text::clean_instruction(get(0, i)?))
                    .collect::<StringArray>(),
            ),
            PureKind::DedupKey => {
                // Hex into a stack buffer and one presized builder: no string per row.
                let mut keys = StringBuilder::with_capacity(n, 32 * n);
                let mut hex = [0u8; 32];
                for i in 0..n {
                    match get(0, i) {
                        Some(value) => {
                            hex::encode_to_slice(text::dedup_digest(value), &mut hex)
                                .expect("32 hex digits for 16 bytes");
                            keys.append_value(std::str::from_utf8(&hex).expect("hex is ASCII"));
                        }
                        None => keys.append_null(),
                    }
                }
                Arc::new(keys.finish())
            }
            PureKind::LogprobScore => {
                let mut expected = Float64Builder::with_capacity(n);
                let mut mass = Float64Builder::with_capacity(n);
                for i in 0..n {
                    let scored = get(0, i).and_then(text::logprob_score);
                    expected.append_option(scored.map(|s| s.0));
                    mass.append_option(scored.map(|s| s.1));
                }
                Arc::new(StructArray::new(
                    Fields::from(vec![
                        Field::new("expected", DataType::Float64, true),
                        Field::new("mass", DataType::Float64, true),
                    ]),
                    vec![Arc::new(expected.finish()), Arc::new(mass.finish())],
                    None,
                ))
            }
            PureKind::WordTrigrams => {
                let mut list = datafusion::arrow::array::ListBuilder::new(StringBuilder::new());
                for i in 0..n {
                    match get(0, i) {
                        Some(t) => {
                            for g in text::word_ngrams(t, 3) {
                                list.values().append_value(g);
                            }
                            list.append(true);
                        }
                        None => list.append(false),
                    }
                }
                Arc::new(list.finish())
            }
            PureKind::TrigramOverlap => Arc::new(
                (0..n)
                    .map(|i| text::ngram_overlap(get(0, i)?, get(1, i)?, 3))
                    .collect::<datafusion::arrow::array::Float64Array>(),
            ),
            PureKind::JudgeScore => judge_scores(n, get),
            PureKind::ParseVerdict => {
                let mut verdict = StringBuilder::new();
                let mut reason = StringBuilder::new();
                for i in 0..n {
                    let parsed = text::parse_verdict(get(0, i), get(1, i));
                    verdict.append_option(parsed.verdict);
                    reason.append_option(parsed.reason);
                }
                let DataType::Struct(fields) = verdict_type() else {
                    unreachable!("a struct")
                };
                Arc::new(StructArray::new(
                    fields,
                    vec![Arc::new(verdict.finish()), Arc::new(reason.finish())],
                    None,
                ))
            }
            PureKind::RefusalPhrase
            | PureKind::SelfReferencePhrase
            | PureKind::SourceReferencePhrase => {
                let find: fn(&str) -> Option<&str> = match self.kind {
                    PureKind::RefusalPhrase => text::refusal_phrase,
                    PureKind::SelfReferencePhrase => text::self_reference_phrase,
                    _ => text::source_reference_phrase,
                };
                Arc::new((0..n).map(|i| find(get(0, i)?)).collect::<StringArray>())
            }
            PureKind::CandidateUnits | PureKind::DocumentUnit | PureKind::MaxRepeats => {
                unreachable!("handled above")
            }
        };
        Ok(ColumnarValue::Array(array))
    }
}

fn judge_score_type() -> DataType {
    DataType::Struct(Fields::from(vec![
        Field::new("score", DataType::Int64, true),
        Field::new("reason", DataType::Utf8, true),
        Field::new("expected", DataType::Float64, true),
        Field::new("mass", DataType::Float64, true),
        Field::new("source", DataType::Utf8, true),
    ]))
}

fn verdict_type() -> DataType {
    DataType::Struct(Fields::from(vec![
        Field::new("verdict", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
    ]))
}

fn judge_scores<'a>(n: usize, get: impl Fn(usize, usize) -> Option<&'a str>) -> ArrayRef {
    let mut score = Int64Builder::with_capacity(n);
    let mut reason = StringBuilder::new();
    let mut expected = Float64Builder::with_capacity(n);
    let mut mass = Float64Builder::with_capacity(n);
    let mut source = StringBuilder::new();
    for i in 0..n {
        let j = text::judge(get(0, i), get(1, i), get(2, i), get(3, i));
        score.append_option(j.score);
        reason.append_option(j.reason);
        expected.append_option(j.expected);
        mass.append_option(j.mass);
        source.append_option(j.source);
    }
    let DataType::Struct(fields) = judge_score_type() else {
        unreachable!("a struct")
    };
    Arc::new(StructArray::new(
        fields,
        vec![
            Arc::new(score.finish()),
            Arc::new(reason.finish()),
            Arc::new(expected.finish()),
            Arc::new(mass.finish()),
            Arc::new(source.finish()),
        ],
        None,
    ))
}

fn max_repeats(args: &[ColumnarValue], n: usize) -> Result<ColumnarValue> {
    let texts = string_columns(&args[..1], n)?.remove(0);
    let periods = match args.get(1) {
        Some(a) => Some(cast(&a.to_array(n)?, &DataType::Int64)?),
        None => None,
    };
    let periods = periods.as_ref().map(|p| {
        p.as_any()
            .downcast_ref::<Int64Array>()
            .expect("cast to Int64")
    });
    let counts: Int64Array = (0..n)
        .map(|i| {
            let period = match periods {
                Some(p) if p.is_null(i) => return None,
                Some(p) => p.value(i).max(1) as usize,
                None => 50,
            };
            (!texts.is_null(i)).then(|| text::max_repeats(texts.value(i), period) as i64)
        })
        .collect();
    Ok(ColumnarValue::Array(Arc::new(counts)))
}

fn scalar_arg(args: &[ColumnarValue], i: usize, name: &str) -> Result<ScalarValue> {
    match &args[i] {
        ColumnarValue::Scalar(s) => Ok(s.clone()),
        ColumnarValue::Array(_) => exec_err!("candidate_units: {name} must be a constant"),
    }
}

/// Argument `i` (`name`) of `function`, which must be a non-negative integer literal.
fn count_arg(args: &[ColumnarValue], i: usize, function: &str, name: &str) -> Result<usize> {
    match scalar_arg(args, i, name)? {
        ScalarValue::Int64(Some(v)) if v >= 0 => Ok(v as usize),
        other => exec_err!("{function}: {name} must be a non-negative integer, got {other}"),
    }
}

fn candidate_units(args: &[ColumnarValue], n: usize) -> Result<ColumnarValue> {
    let mode = match scalar_arg(args, 1, "mode")? {
        ScalarValue::Utf8(Some(m)) => CandidateMode::parse(&m),
        _ => None,
    };
    let Some(mode) = mode else {
        return exec_err!("candidate_units: mode must be 'document' or 'segments'");
    };
    let int = |i, name| count_arg(args, i, "candidate_units", name);
    let repeat_jaccard = match scalar_arg(args, 4, "repeat_jaccard")? {
        ScalarValue::Float64(Some(v)) => v,
        other => return exec_err!("candidate_units: repeat_jaccard must be a number, got {other}"),
    };
    let rules = UnitRules {
        mode,
        min_chars: int(2, "min_chars")?,
        max_chars: int(3, "max_chars")?,
        repeat_jaccard,
    };
    let texts = string_columns(&args[..1], n)?.remove(0);
    let mut offsets = vec![0i32];
    let mut ordinal = Vec::new();
    let mut header = StringBuilder::new();
    let mut body = StringBuilder::new();
    let mut drop = StringBuilder::new();
    for i in 0..n {
        if !texts.is_null(i) {
            for unit in text::cut_units(texts.value(i), &rules) {
                ordinal.push(unit.ordinal);
                header.append_option(unit.header);
                body.append_value(unit.text);
                drop.append_option(unit.drop);
            }
        }
        offsets.push(ordinal.len() as i32);
    }
    let DataType::Struct(fields) = unit_type() else {
        unreachable!("a struct")
    };
    let values = StructArray::new(
        fields,
        vec![
            Arc::new(Int64Array::from(ordinal)),
            Arc::new(header.finish()),
            Arc::new(body.finish()),
            Arc::new(drop.finish()),
        ],
        None,
    );
    let list = ListArray::new(
        Arc::new(Field::new("item", unit_type(), true)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(values),
        None,
    );
    Ok(ColumnarValue::Array(Arc::new(list)))
}

/// Document mode without a list to unnest: one unit per row, the text trimmed. When no text
/// of the batch has whitespace to trim, the unit texts share the input's buffers.
fn document_unit(args: &[ColumnarValue], n: usize) -> Result<ColumnarValue> {
    let int = |i, name| count_arg(args, i, "document_unit", name);
    let rules = UnitRules {
        mode: CandidateMode::Document,
        min_chars: int(1, "min_chars")?,
        max_chars: int(2, "max_chars")?,
        repeat_jaccard: 1.0,
    };
    let texts = string_columns(&args[..1], n)?.remove(0);
    let mut drop = StringBuilder::with_capacity(n, 0);
    let mut bodies = Vec::with_capacity(n);
    for text in texts.iter() {
        let body = text.map(str::trim);
        drop.append_option(match body {
            Some(body) => text::document_problem(body, &rules),
            None => Some("empty"),
        });
        bodies.push(body);
    }
    let drop = drop.finish();
    let offsets = texts.value_offsets();
    let text_bytes = (offsets[n] - offsets[0]) as usize;
    let trimmed = texts.null_count() == 0
        && bodies.iter().flatten().map(|b| b.len()).sum::<usize>() == text_bytes;
    let body: ArrayRef = if trimmed {
        Arc::new(texts)
    } else {
        // Presized: collecting into a growing buffer copied each batch's text several times.
        let mut trimmed = StringBuilder::with_capacity(n, text_bytes);
        bodies
            .iter()
            .for_each(|b| trimmed.append_value(b.unwrap_or("")));
        Arc::new(trimmed.finish())
    };
    let DataType::Struct(fields) = unit_type() else {
        unreachable!("a struct")
    };
    Ok(ColumnarValue::Array(Arc::new(StructArray::new(
        fields,
        vec![
            Arc::new(Int64Array::from(vec![0; n])),
            datafusion::arrow::array::new_null_array(&DataType::Utf8, n),
            body,
            Arc::new(drop),
        ],
        None,
    ))))
}

/// Prepare functions that follow the job's settings.
#[derive(Debug, PartialEq, Eq, Hash, Clone, Copy)]
enum PrepareKind {
    /// `clean_document(text)` -> struct(text, boilerplate_lines)
    CleanDocument,
    /// `quality_problem(text [, metadata])` -> the first quality rule failed, or NULL
    QualityProblem,
    /// `minhash(text)` -> list of uint32, the MinHash signature
    MinHash,
}

#[derive(Debug)]
struct Prepare {
    kind: PrepareKind,
    rules: Arc<PrepareRules>,
    key: String,
    signature: Signature,
}

impl PartialEq for Prepare {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.key == other.key
    }
}

impl Eq for Prepare {}

impl std::hash::Hash for Prepare {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        self.key.hash(state);
    }
}

impl Prepare {
    fn new(kind: PrepareKind, rules: &Arc<PrepareRules>) -> Self {
        Self {
            kind,
            key: serde_json::to_string(rules.as_ref()).unwrap_or_default(),
            rules: Arc::clone(rules),
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }

    fn clean_type() -> DataType {
        DataType::Struct(Fields::from(vec![
            Field::new("text", DataType::Utf8, true),
            Field::new("boilerplate_lines", DataType::Int64, true),
        ]))
    }
}

impl ScalarUDFImpl for Prepare {
    fn name(&self) -> &str {
        match self.kind {
            PrepareKind::CleanDocument => "clean_document",
            PrepareKind::QualityProblem => "quality_problem",
            PrepareKind::MinHash => "minhash",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match self.kind {
            PrepareKind::QualityProblem if arg_types.len() == 2 => {
                coerce_strings(self.name(), &["text", "metadata"], arg_types)
            }
            _ => coerce_strings(self.name(), &["text"], arg_types),
        }
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            PrepareKind::CleanDocument => Self::clean_type(),
            PrepareKind::QualityProblem => DataType::Utf8,
            PrepareKind::MinHash => {
                DataType::List(Arc::new(Field::new("item", DataType::UInt32, true)))
            }
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let cols = string_columns(&args.args, n)?;
        let get = |c: usize, i: usize| {
            cols.get(c)
                .and_then(|a| (!a.is_null(i)).then(|| a.value(i)))
        };
        let array: ArrayRef = match self.kind {
            PrepareKind::CleanDocument => {
                let (text, lines): (ArrayRef, ArrayRef) = match self.rules.quality.boilerplate {
                    // Nothing to strip or count: the documents' own buffers, not a copy.
                    None => (
                        Arc::new(cols[0].clone()),
                        datafusion::arrow::array::new_null_array(&DataType::Int64, n),
                    ),
                    Some(mode) => {
                        let strip = mode == crate::quality::Boilerplate::Strip;
                        let cleaned: Vec<Option<(Cow<str>, usize)>> = (0..n)
                            .map(|i| get(0, i).map(|t| crate::quality::clean_document(t, strip)))
                            .collect();
                        let lines: Int64Array = cleaned
                            .iter()
                            .map(|c| c.as_ref().map(|(_, count)| *count as i64))
                            .collect();
                        let changed = cleaned
                            .iter()
                            .any(|c| matches!(c, Some((Cow::Owned(_), _))));
                        let text: ArrayRef = if changed {
                            let bytes = cleaned.iter().flatten().map(|(t, _)| t.len()).sum();
                            let mut text = StringBuilder::with_capacity(n, bytes);
                            for c in &cleaned {
                                text.append_option(c.as_ref().map(|(t, _)| t));
                            }
                            Arc::new(text.finish())
                        } else {
                            // Nothing stripped in this batch: the documents' own buffers.
                            Arc::new(cols[0].clone())
                        };
                        (text, Arc::new(lines))
                    }
                };
                let DataType::Struct(fields) = Self::clean_type() else {
                    unreachable!("a struct")
                };
                Arc::new(StructArray::new(fields, vec![text, lines], None))
            }
            PrepareKind::QualityProblem => Arc::new(
                (0..n)
                    .map(|i| self.rules.quality.problem(get(0, i)?, get(1, i)))
                    .collect::<StringArray>(),
            ),
            PrepareKind::MinHash => {
                let mut list = datafusion::arrow::array::ListBuilder::new(
                    datafusion::arrow::array::UInt32Builder::new(),
                );
                for i in 0..n {
                    match get(0, i) {
                        Some(t) => {
                            list.values().append_slice(&crate::minhash::signature(
                                t,
                                &self.rules.near_dedup,
                            ));
                            list.append(true);
                        }
                        None => list.append(false),
                    }
                }
                Arc::new(list.finish())
            }
        };
        Ok(ColumnarValue::Array(array))
    }
}

/// `token_count(text)`: tokens under the job's tokenizer.
#[derive(Debug)]
struct TokenCount {
    tokens: TokenCounter,
    signature: Signature,
}

impl PartialEq for TokenCount {
    fn eq(&self, other: &Self) -> bool {
        self.tokens.label() == other.tokens.label()
    }
}

impl Eq for TokenCount {}

impl std::hash::Hash for TokenCount {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.tokens.label().hash(state);
    }
}

impl TokenCount {
    fn new(tokens: TokenCounter) -> Self {
        Self {
            tokens,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for TokenCount {
    fn name(&self) -> &str {
        "token_count"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        coerce_strings("token_count", &["text"], arg_types)
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let texts = string_columns(&args.args, args.number_rows)?.remove(0);
        let counts: Int64Array = texts
            .iter()
            .map(|t| t.map(|t| self.tokens.count(t) as i64))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(counts)))
    }
}
