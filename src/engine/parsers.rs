//! The parsers of LLM output as SQL functions, one [`PureFunction`] row each, so a threshold
//! or parser can be re-run on stored replies without calling a model again.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Float64Array, Float64Builder, Int64Array, Int64Builder, ListBuilder, StringArray,
    StringBuilder, StructArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::error::Result;
use datafusion::logical_expr::ColumnarValue;

use crate::engine::args::{int_column, string_columns};
use crate::engine::pure::{Param, PureFunction};
use crate::parse;

/// Every parser, in the order they are registered.
pub const PARSERS: &[PureFunction] = &[
    PureFunction {
        name: "parse_score",
        params: &[Param::Text("raw"), Param::Text("finish_reason")],
        optional: 1,
        returns: || DataType::Struct(score_fields()),
        invoke: parse_score,
    },
    PureFunction {
        name: "extract_tagged",
        params: &[Param::Text("raw"), Param::Text("tag")],
        optional: 0,
        returns: || DataType::Utf8,
        invoke: |args, n| {
            texts(args, n, |get, i| {
                parse::extract_tagged(get(0, i)?, get(1, i)?)
            })
        },
    },
    PureFunction {
        name: "tag_problem",
        params: &[
            Param::Text("raw"),
            Param::Text("tag"),
            Param::Text("finish_reason"),
        ],
        optional: 1,
        returns: || DataType::Utf8,
        invoke: |args, n| {
            texts(args, n, |get, i| {
                parse::tag_problem(get(0, i), get(1, i).unwrap_or("RES"), get(2, i))
                    .map(str::to_string)
            })
        },
    },
    PureFunction {
        name: "clean_instruction",
        params: &[Param::Text("raw")],
        optional: 0,
        returns: || DataType::Utf8,
        invoke: |args, n| texts(args, n, |get, i| parse::clean_instruction(get(0, i)?)),
    },
    PureFunction {
        name: "logprob_score",
        params: &[Param::Text("top_logprobs")],
        optional: 0,
        returns: || DataType::Struct(logprob_fields()),
        invoke: logprob_score,
    },
    PureFunction {
        name: "word_trigrams",
        params: &[Param::Text("text")],
        optional: 0,
        returns: || DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        invoke: word_trigrams,
    },
    PureFunction {
        name: "trigram_overlap",
        params: &[Param::Text("text"), Param::Text("reference")],
        optional: 0,
        returns: || DataType::Float64,
        invoke: |args, n| {
            let cols = string_columns(args, n)?;
            let get = getter(&cols);
            Ok(Arc::new(
                (0..n)
                    .map(|i| parse::ngram_overlap(get(0, i)?, get(1, i)?, 3))
                    .collect::<Float64Array>(),
            ))
        },
    },
    PureFunction {
        name: "judge_score",
        params: &[
            Param::Text("text"),
            Param::Text("finish_reason"),
            Param::Text("error"),
            Param::Text("top_logprobs"),
        ],
        optional: 0,
        returns: || DataType::Struct(judge_fields()),
        invoke: judge_score,
    },
    PureFunction {
        name: "parse_verdict",
        params: &[Param::Text("raw"), Param::Text("finish_reason")],
        optional: 1,
        returns: || DataType::Struct(verdict_fields()),
        invoke: parse_verdict,
    },
    PureFunction {
        name: "refusal_phrase",
        params: &[Param::Text("text")],
        optional: 0,
        returns: || DataType::Utf8,
        invoke: |args, n| phrases(args, n, parse::refusal_phrase),
    },
    PureFunction {
        name: "self_reference_phrase",
        params: &[Param::Text("text")],
        optional: 0,
        returns: || DataType::Utf8,
        invoke: |args, n| phrases(args, n, parse::self_reference_phrase),
    },
    PureFunction {
        name: "source_reference_phrase",
        params: &[Param::Text("text")],
        optional: 0,
        returns: || DataType::Utf8,
        invoke: |args, n| phrases(args, n, parse::source_reference_phrase),
    },
    PureFunction {
        name: "max_repeats",
        params: &[Param::Text("text"), Param::Int("max_period")],
        optional: 1,
        returns: || DataType::Int64,
        invoke: max_repeats,
    },
];

type Get<'a> = dyn Fn(usize, usize) -> Option<&'a str> + 'a;

/// Column `c`, row `i` of `cols`, or `None` when absent or NULL.
fn getter<'a>(cols: &'a [StringArray]) -> impl Fn(usize, usize) -> Option<&'a str> + 'a {
    move |c, i| {
        use datafusion::arrow::array::Array;
        cols.get(c)
            .and_then(|a| (!a.is_null(i)).then(|| a.value(i)))
    }
}

/// A string column of `n` rows, row `i` computed by `row` from the string arguments.
fn texts(
    args: &[ColumnarValue],
    n: usize,
    row: impl Fn(&Get<'_>, usize) -> Option<String>,
) -> Result<ArrayRef> {
    let cols = string_columns(args, n)?;
    let get = getter(&cols);
    Ok(Arc::new(
        (0..n).map(|i| row(&get, i)).collect::<StringArray>(),
    ))
}

fn phrases(args: &[ColumnarValue], n: usize, find: fn(&str) -> Option<&str>) -> Result<ArrayRef> {
    let cols = string_columns(args, n)?;
    let get = getter(&cols);
    Ok(Arc::new(
        (0..n).map(|i| find(get(0, i)?)).collect::<StringArray>(),
    ))
}

fn score_fields() -> Fields {
    Fields::from(vec![
        Field::new("score", DataType::Int64, true),
        Field::new("reason", DataType::Utf8, true),
    ])
}

fn parse_score(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
    let cols = string_columns(args, n)?;
    let get = getter(&cols);
    let mut score = Int64Builder::with_capacity(n);
    let mut reason = StringBuilder::new();
    for i in 0..n {
        let parsed = parse::parse_score(get(0, i), get(1, i));
        score.append_option(parsed.score);
        reason.append_option(parsed.reason);
    }
    Ok(Arc::new(StructArray::new(
        score_fields(),
        vec![Arc::new(score.finish()), Arc::new(reason.finish())],
        None,
    )))
}

fn logprob_fields() -> Fields {
    Fields::from(vec![
        Field::new("expected", DataType::Float64, true),
        Field::new("mass", DataType::Float64, true),
    ])
}

fn logprob_score(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
    let cols = string_columns(args, n)?;
    let get = getter(&cols);
    let mut expected = Float64Builder::with_capacity(n);
    let mut mass = Float64Builder::with_capacity(n);
    for i in 0..n {
        let scored = get(0, i).and_then(parse::logprob_score);
        expected.append_option(scored.map(|s| s.0));
        mass.append_option(scored.map(|s| s.1));
    }
    Ok(Arc::new(StructArray::new(
        logprob_fields(),
        vec![Arc::new(expected.finish()), Arc::new(mass.finish())],
        None,
    )))
}

fn word_trigrams(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
    let cols = string_columns(args, n)?;
    let get = getter(&cols);
    let mut list = ListBuilder::new(StringBuilder::new());
    for i in 0..n {
        match get(0, i) {
            Some(t) => {
                for g in parse::word_ngrams(t, 3) {
                    list.values().append_value(g);
                }
                list.append(true);
            }
            None => list.append(false),
        }
    }
    Ok(Arc::new(list.finish()))
}

fn judge_fields() -> Fields {
    Fields::from(vec![
        Field::new("score", DataType::Int64, true),
        Field::new("reason", DataType::Utf8, true),
        Field::new("expected", DataType::Float64, true),
        Field::new("mass", DataType::Float64, true),
        Field::new("source", DataType::Utf8, true),
    ])
}

/// `judge_score(text, finish_reason, error, top_logprobs)`: the score of a scoring reply in
/// either mode, with where it came from.
fn judge_score(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
    let cols = string_columns(args, n)?;
    let get = getter(&cols);
    let mut score = Int64Builder::with_capacity(n);
    let mut reason = StringBuilder::new();
    let mut expected = Float64Builder::with_capacity(n);
    let mut mass = Float64Builder::with_capacity(n);
    let mut source = StringBuilder::new();
    for i in 0..n {
        let j = parse::judge(get(0, i), get(1, i), get(2, i), get(3, i));
        score.append_option(j.score);
        reason.append_option(j.reason);
        expected.append_option(j.expected);
        mass.append_option(j.mass);
        source.append_option(j.source);
    }
    Ok(Arc::new(StructArray::new(
        judge_fields(),
        vec![
            Arc::new(score.finish()),
            Arc::new(reason.finish()),
            Arc::new(expected.finish()),
            Arc::new(mass.finish()),
            Arc::new(source.finish()),
        ],
        None,
    )))
}

fn verdict_fields() -> Fields {
    Fields::from(vec![
        Field::new("verdict", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
    ])
}

fn parse_verdict(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
    let cols = string_columns(args, n)?;
    let get = getter(&cols);
    let mut verdict = StringBuilder::new();
    let mut reason = StringBuilder::new();
    for i in 0..n {
        let parsed = parse::parse_verdict(get(0, i), get(1, i));
        verdict.append_option(parsed.verdict);
        reason.append_option(parsed.reason);
    }
    Ok(Arc::new(StructArray::new(
        verdict_fields(),
        vec![Arc::new(verdict.finish()), Arc::new(reason.finish())],
        None,
    )))
}

/// `max_repeats(text [, max_period])`: copies in the longest back-to-back repeat of a word
/// sequence of up to `max_period` words (default 50).
fn max_repeats(args: &[ColumnarValue], n: usize) -> Result<ArrayRef> {
    let texts = string_columns(&args[..1], n)?.remove(0);
    let periods = int_column(args, 1, n)?;
    use datafusion::arrow::array::Array;
    let counts: Int64Array = (0..n)
        .map(|i| {
            let period = match &periods {
                Some(p) if p.is_null(i) => return None,
                Some(p) => p.value(i).max(1) as usize,
                None => 50,
            };
            (!texts.is_null(i)).then(|| parse::max_repeats(texts.value(i), period) as i64)
        })
        .collect();
    Ok(Arc::new(counts))
}
