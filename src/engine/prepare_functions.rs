//! The prepare stage's functions: cutting documents into candidate units, the exact-dedup
//! key, and the functions that follow the job's `[prepare]` settings (boilerplate, quality
//! rules, MinHash) or its tokenizer.

use std::borrow::Cow;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Int64Array, ListArray, ListBuilder, StringArray, StringBuilder, StructArray,
    UInt32Builder, UInt64Array, new_null_array,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::{ScalarValue, exec_err};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::engine::args::{coerce_strings, count_arg, scalar_arg, string_columns};
use crate::engine::pure::{Param, PureFunction};
use crate::prepare::decontaminate::BenchmarkIndex;
use crate::prepare::dedup_key::dedup_digest;
use crate::prepare::minhash::{NearDedup, signature};
use crate::prepare::quality::{Boilerplate, QualityRules, clean_document};
use crate::prepare::segment::{CandidateMode, UnitRules, cut_units, document_problem};
use crate::prepare::tokens::TokenCounter;

/// The prepare functions that need no settings.
pub const UNITS: &[PureFunction] = &[
    PureFunction {
        name: "dedup_key",
        params: &[Param::Text("text")],
        optional: 0,
        returns: || DataType::Utf8,
        invoke: dedup_key,
    },
    PureFunction {
        name: "candidate_units",
        params: &[
            Param::Text("text"),
            Param::Text("mode"),
            Param::Int("min_chars"),
            Param::Int("max_chars"),
            Param::Float("repeat_jaccard"),
        ],
        optional: 0,
        returns: || {
            DataType::List(Arc::new(Field::new(
                "item",
                DataType::Struct(unit_fields()),
                true,
            )))
        },
        invoke: candidate_units,
    },
    PureFunction {
        name: "document_unit",
        params: &[
            Param::Text("text"),
            Param::Int("min_chars"),
            Param::Int("max_chars"),
        ],
        optional: 0,
        returns: || DataType::Struct(unit_fields()),
        invoke: document_unit,
    },
    PureFunction {
        name: "hash64",
        params: &[Param::Text("text")],
        optional: 0,
        returns: || DataType::UInt64,
        invoke: hash64,
    },
];

/// The job's settings behind `clean_document`, `quality_problem` and `minhash`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PrepareRules {
    /// Quality rules.
    pub quality: QualityRules,
    /// MinHash parameters (the defaults when the job sets none).
    pub near_dedup: NearDedup,
}

/// The functions that follow the job's settings.
pub fn configured_udfs(tokens: TokenCounter, rules: PrepareRules) -> Vec<ScalarUDF> {
    let rules = Arc::new(rules);
    vec![
        ScalarUDF::new_from_impl(Configured::new(&CLEAN_DOCUMENT, &rules)),
        ScalarUDF::new_from_impl(Configured::new(&QUALITY_PROBLEM, &rules)),
        ScalarUDF::new_from_impl(Configured::new(&MINHASH, &rules)),
        ScalarUDF::new_from_impl(TokenCount::new(tokens)),
    ]
}

fn unit_fields() -> Fields {
    Fields::from(vec![
        Field::new("ordinal", DataType::Int64, false),
        Field::new("header", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, false),
        Field::new("drop", DataType::Utf8, true),
    ])
}

/// `dedup_key(text)`: the hex exact-dedup key, written into one presized builder through a
/// stack buffer (no string per row).
fn dedup_key(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
    let texts = string_columns(args, n)?.remove(0);
    let mut keys = StringBuilder::with_capacity(n, 32 * n);
    let mut hex = [0u8; 32];
    for value in texts.iter() {
        match value {
            Some(value) => {
                hex::encode_to_slice(dedup_digest(value), &mut hex)
                    .expect("32 hex digits for 16 bytes");
                keys.append_value(std::str::from_utf8(&hex).expect("hex is ASCII"));
            }
            None => keys.append_null(),
        }
    }
    Ok(Arc::new(keys.finish()))
}

/// `hash64(text)`: the first eight bytes of the text's SHA-256, the same on every machine and
/// in every version. Whole-table checks group by it instead of the text (eight bytes a row
/// rather than the string and its copies); it also draws samples and splits that a rerun
/// repeats (`WHERE hash64(doc_id) % 100 < 5`).
fn hash64(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
    use sha2::{Digest, Sha256};
    let texts = string_columns(args, n)?.remove(0);
    let hashes: UInt64Array = texts
        .iter()
        .map(|value| {
            value.map(|v| {
                let digest = Sha256::digest(v.as_bytes());
                u64::from_be_bytes(digest[..8].try_into().expect("eight bytes"))
            })
        })
        .collect();
    Ok(Arc::new(hashes))
}

fn candidate_units(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
    let mode = match scalar_arg(args, 1, "candidate_units", "mode")? {
        ScalarValue::Utf8(Some(m)) => CandidateMode::parse(&m),
        _ => None,
    };
    let Some(mode) = mode else {
        return exec_err!("candidate_units: mode must be 'document' or 'segments'");
    };
    let int = |i, name| count_arg(args, i, "candidate_units", name);
    let repeat_jaccard = match scalar_arg(args, 4, "candidate_units", "repeat_jaccard")? {
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
            for unit in cut_units(texts.value(i), &rules) {
                ordinal.push(unit.ordinal);
                header.append_option(unit.header);
                body.append_value(unit.text);
                drop.append_option(unit.drop);
            }
        }
        offsets.push(ordinal.len() as i32);
    }
    let values = StructArray::new(
        unit_fields(),
        vec![
            Arc::new(Int64Array::from(ordinal)),
            Arc::new(header.finish()),
            Arc::new(body.finish()),
            Arc::new(drop.finish()),
        ],
        None,
    );
    let list = ListArray::new(
        Arc::new(Field::new("item", DataType::Struct(unit_fields()), true)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(values),
        None,
    );
    Ok(Arc::new(list))
}

/// Document mode without a list to unnest: one unit per row, the text trimmed. When no text
/// of the batch has whitespace to trim, the unit texts share the input's buffers.
fn document_unit(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
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
            Some(body) => document_problem(body, &rules),
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
    Ok(Arc::new(StructArray::new(
        unit_fields(),
        vec![
            Arc::new(Int64Array::from(vec![0; n])),
            datafusion::arrow::array::new_null_array(&DataType::Utf8, n),
            body,
            Arc::new(drop),
        ],
        None,
    )))
}

/// A prepare function that follows the job's rules.
#[derive(Debug)]
struct ConfiguredFunction {
    name: &'static str,
    params: &'static [&'static str],
    optional: usize,
    returns: fn() -> DataType,
    invoke: fn(&PrepareRules, &[StringArray], usize) -> ArrayRef,
}

/// `clean_document(text)`: struct(text, boilerplate_lines).
const CLEAN_DOCUMENT: ConfiguredFunction = ConfiguredFunction {
    name: "clean_document",
    params: &["text"],
    optional: 0,
    returns: || DataType::Struct(clean_fields()),
    invoke: clean_documents,
};

/// `quality_problem(text [, metadata])`: the first quality rule failed, or NULL.
const QUALITY_PROBLEM: ConfiguredFunction = ConfiguredFunction {
    name: "quality_problem",
    params: &["text", "metadata"],
    optional: 1,
    returns: || DataType::Utf8,
    invoke: |rules, cols, n| {
        let metadata = cols.get(1);
        Arc::new(
            (0..n)
                .map(|i| {
                    let text = (!cols[0].is_null(i)).then(|| cols[0].value(i))?;
                    let meta = metadata.and_then(|m| (!m.is_null(i)).then(|| m.value(i)));
                    rules.quality.problem(text, meta)
                })
                .collect::<StringArray>(),
        )
    },
};

/// `minhash(text)`: the text's MinHash signature.
const MINHASH: ConfiguredFunction = ConfiguredFunction {
    name: "minhash",
    params: &["text"],
    optional: 0,
    returns: || DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
    invoke: |rules, cols, _n| {
        let mut list = ListBuilder::new(UInt32Builder::new());
        for text in cols[0].iter() {
            match text {
                Some(t) => {
                    list.values().append_slice(&signature(t, &rules.near_dedup));
                    list.append(true);
                }
                None => list.append(false),
            }
        }
        Arc::new(list.finish())
    },
};

fn clean_fields() -> Fields {
    Fields::from(vec![
        Field::new("text", DataType::Utf8, true),
        Field::new("boilerplate_lines", DataType::Int64, true),
    ])
}

fn clean_documents(rules: &PrepareRules, cols: &[StringArray], n: usize) -> ArrayRef {
    let texts = &cols[0];
    let (text, lines): (ArrayRef, ArrayRef) = match rules.quality.boilerplate {
        // Nothing to strip or count: the documents' own buffers, not a copy.
        None => (Arc::new(texts.clone()), new_null_array(&DataType::Int64, n)),
        Some(mode) => {
            let strip = mode == Boilerplate::Strip;
            let cleaned: Vec<Option<(Cow<str>, usize)>> = texts
                .iter()
                .map(|t| t.map(|t| clean_document(t, strip)))
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
                Arc::new(texts.clone())
            };
            (text, Arc::new(lines))
        }
    };
    Arc::new(StructArray::new(clean_fields(), vec![text, lines], None))
}

/// The UDF of a [`ConfiguredFunction`] bound to the job's rules.
#[derive(Debug)]
struct Configured {
    function: &'static ConfiguredFunction,
    rules: Arc<PrepareRules>,
    /// The rules as JSON, so two sessions' functions compare equal only under equal rules.
    key: String,
    signature: Signature,
}

impl PartialEq for Configured {
    fn eq(&self, other: &Self) -> bool {
        self.function.name == other.function.name && self.key == other.key
    }
}

impl Eq for Configured {}

impl std::hash::Hash for Configured {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.function.name.hash(state);
        self.key.hash(state);
    }
}

impl Configured {
    fn new(function: &'static ConfiguredFunction, rules: &Arc<PrepareRules>) -> Self {
        Self {
            function,
            key: serde_json::to_string(rules.as_ref()).unwrap_or_default(),
            rules: Arc::clone(rules),
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Configured {
    fn name(&self) -> &str {
        self.function.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let f = self.function;
        let given = arg_types
            .len()
            .clamp(f.params.len() - f.optional, f.params.len());
        coerce_strings(f.name, &f.params[..given], arg_types)
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok((self.function.returns)())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let cols = string_columns(&args.args, n)?;
        Ok(ColumnarValue::Array((self.function.invoke)(
            &self.rules,
            &cols,
            n,
        )))
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

/// `benchmark_match(label, text [, label, text ...])`: the strongest match of a row's texts
/// (each named by its label) against the run's benchmark index, NULL when clean.
#[derive(Debug)]
pub struct BenchmarkMatch {
    index: Option<Arc<BenchmarkIndex>>,
    signature: Signature,
}

impl PartialEq for BenchmarkMatch {
    fn eq(&self, other: &Self) -> bool {
        match (&self.index, &other.index) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        }
    }
}

impl Eq for BenchmarkMatch {}

impl std::hash::Hash for BenchmarkMatch {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        "benchmark_match".hash(state);
    }
}

impl BenchmarkMatch {
    /// The function over `index`; without one (a session that only plans) it fails if run.
    pub fn udf(index: Option<Arc<BenchmarkIndex>>) -> ScalarUDF {
        ScalarUDF::new_from_impl(Self {
            index,
            signature: Signature::user_defined(Volatility::Immutable),
        })
    }
}

fn match_fields() -> Fields {
    Fields::from(vec![
        Field::new("benchmark", DataType::Utf8, true),
        Field::new("item", DataType::Utf8, true),
        Field::new("field", DataType::Utf8, true),
        Field::new("column", DataType::Utf8, true),
        Field::new("shared", DataType::Int64, true),
        Field::new("overlap", DataType::Float64, true),
    ])
}

impl ScalarUDFImpl for BenchmarkMatch {
    fn name(&self) -> &str {
        "benchmark_match"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if arg_types.is_empty() || arg_types.len() % 2 != 0 {
            return datafusion::common::plan_err!(
                "benchmark_match takes pairs of (label, text), got {} argument(s)",
                arg_types.len()
            );
        }
        let params: Vec<&str> = (0..arg_types.len())
            .map(|i| if i % 2 == 0 { "label" } else { "text" })
            .collect();
        coerce_strings("benchmark_match", &params, arg_types)
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Struct(match_fields()))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let Some(index) = &self.index else {
            return exec_err!(
                "benchmark_match: the job has no [decontaminate] benchmarks, or their index was not built for this stage"
            );
        };
        let n = args.number_rows;
        let columns = string_columns(&args.args, n)?;
        let mut benchmark = StringBuilder::new();
        let mut item = StringBuilder::new();
        let mut field = StringBuilder::new();
        let mut column = StringBuilder::new();
        let mut shared = Vec::with_capacity(n);
        let mut overlap = Vec::with_capacity(n);
        let mut valid = Vec::with_capacity(n);
        for i in 0..n {
            let texts: Vec<(&str, &str)> = columns
                .chunks(2)
                .filter(|pair| !pair[1].is_null(i))
                .map(|pair| (pair[0].value(i), pair[1].value(i)))
                .collect();
            let found = index.check(&texts);
            valid.push(found.is_some());
            benchmark.append_option(found.as_ref().map(|m| m.benchmark.as_str()));
            item.append_option(found.as_ref().map(|m| m.item.as_str()));
            field.append_option(found.as_ref().map(|m| m.field.as_str()));
            column.append_option(found.as_ref().map(|m| m.column.as_str()));
            shared.push(found.as_ref().map(|m| m.shared as i64));
            overlap.push(found.as_ref().map(|m| m.overlap));
        }
        let matches = StructArray::new(
            match_fields(),
            vec![
                Arc::new(benchmark.finish()),
                Arc::new(item.finish()),
                Arc::new(field.finish()),
                Arc::new(column.finish()),
                Arc::new(Int64Array::from(shared)),
                Arc::new(datafusion::arrow::array::Float64Array::from(overlap)),
            ],
            Some(valid.into()),
        );
        Ok(ColumnarValue::Array(Arc::new(matches)))
    }
}
