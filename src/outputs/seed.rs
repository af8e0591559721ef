//! `backforth seed`: seed pairs from Open Assistant (OASST1/OASST2) message trees, as both
//! papers select them: the first turn of a conversation, English, the reply ranked 0 by the
//! annotators; then the best `count` by the annotators' quality labels.
//!
//! Reads the released formats: the flat message table (JSONL, plain/.gz/.zst, or the Parquet
//! of the Hugging Face release) and the nested trees JSONL. A malformed tree (a missing parent,
//! a cycle, an unknown role, a duplicate id, a message without its fields) is left out whole
//! and reported with the file, line and message; the rest of the file is still used.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StructArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Context, Error, Result};
use crate::outputs::export::{self, Format, Pair, TagMode};
use crate::prepare::ingest::{MAX_LINE_BYTES, read_capped_line};
use crate::root::objects::parquet_of;

/// The number of seed pairs both papers use.
pub const DEFAULT_COUNT: usize = 3200;

/// One OASST message, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `message_id`.
    pub id: String,
    /// `parent_id` (`None` for the prompt that starts a tree).
    pub parent: Option<String>,
    /// `message_tree_id` (the root's id when absent).
    pub tree: String,
    /// `prompter` or `assistant`.
    pub role: String,
    /// Language code (`en`, ...).
    pub lang: String,
    /// Annotators' rank among siblings, 0 best.
    pub rank: Option<i64>,
    /// The text.
    pub text: String,
    /// Deleted by moderators, or failing review.
    pub rejected: bool,
    /// The `quality` label's mean value.
    pub quality: Option<f64>,
    /// Where it was read (`file:line`).
    pub at: String,
}

/// A problem with the input, reported rather than fatal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// `file:line` of the message.
    pub at: String,
    /// The tree left out (empty when the line could not be read at all).
    pub tree: String,
    /// What kind of problem (`cycle`, `missing parent`, ...), for the summary.
    pub kind: &'static str,
    /// What is wrong and what was done.
    pub message: String,
}

/// A selected seed pair.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedPair {
    /// The reply's message id.
    pub id: String,
    /// The conversation tree.
    pub tree: String,
    /// The first prompt.
    pub instruction: String,
    /// The reply ranked 0.
    pub response: String,
    /// Quality label of the prompt.
    pub instruction_quality: Option<f64>,
    /// Quality label of the reply.
    pub response_quality: Option<f64>,
}

/// What `seed` read, left out and kept.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SeedReport {
    /// Messages read.
    pub messages: u64,
    /// Conversation trees seen.
    pub trees: u64,
    /// Trees left out as malformed.
    pub malformed_trees: u64,
    /// First-turn English pairs with a reply ranked 0.
    pub eligible: u64,
    /// Pairs written.
    pub kept: u64,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

/// Reads every message of `input`, collecting unreadable lines as problems.
pub async fn read_messages(input: &Path, problems: &mut Vec<Problem>) -> Result<Vec<Message>> {
    let name = input.display().to_string();
    if name.ends_with(".parquet") {
        return read_parquet(input, problems).await;
    }
    let file =
        std::fs::File::open(input).map_err(|e| Error::Job(format!("seed input {name}: {e}")))?;
    let reader: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else if name.ends_with(".zst") {
        Box::new(zstd::Decoder::new(file)?)
    } else {
        Box::new(file)
    };
    let mut out = Vec::new();
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut bytes = Vec::new();
    for i in 0.. {
        let at = format!("{name}:{}", i + 1);
        bytes.clear();
        let fits = read_capped_line(&mut reader, &mut bytes, MAX_LINE_BYTES)
            .with_context(|| at.clone())?;
        if bytes.is_empty() && fits {
            break;
        }
        if !fits {
            problems.push(Problem {
                at,
                tree: String::new(),
                kind: "unreadable line",
                message: format!("longer than {MAX_LINE_BYTES} bytes; line skipped"),
            });
            continue;
        }
        let line = String::from_utf8_lossy(&bytes);
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    at,
                    tree: String::new(),
                    kind: "unreadable line",
                    message: format!("not valid JSON ({e}); line skipped"),
                });
                continue;
            }
        };
        if let Some(prompt) = value.get("prompt") {
            // A nested tree: the prompt and its replies, recursively.
            let tree = value["message_tree_id"].as_str().map(str::to_string);
            flatten_tree(prompt, None, tree, &at, &mut out, problems);
        } else {
            match message_from_json(&value, None, None, &at) {
                Ok(m) => out.push(m),
                Err(p) => problems.push(p),
            }
        }
    }
    Ok(out)
}

fn flatten_tree(
    node: &Value,
    parent: Option<&str>,
    tree: Option<String>,
    at: &str,
    out: &mut Vec<Message>,
    problems: &mut Vec<Problem>,
) {
    let message = match message_from_json(node, parent, tree.clone(), at) {
        Ok(m) => m,
        Err(p) => {
            problems.push(p);
            return;
        }
    };
    if let (Some(parent), Some(written)) = (parent, node["parent_id"].as_str())
        && parent != written
    {
        problems.push(Problem {
            at: at.to_string(),
            tree: message.tree.clone(),
            kind: "parent mismatch",
            message: format!(
                "message {} sits under {parent} but names parent {written}; tree left out",
                message.id
            ),
        });
    }
    let id = message.id.clone();
    let tree = Some(message.tree.clone());
    out.push(message);
    if let Some(replies) = node["replies"].as_array() {
        for reply in replies {
            flatten_tree(reply, Some(&id), tree.clone(), at, out, problems);
        }
    }
}

fn message_from_json(
    v: &Value,
    parent: Option<&str>,
    tree: Option<String>,
    at: &str,
) -> std::result::Result<Message, Problem> {
    let field = |name: &str| v.get(name).and_then(Value::as_str).map(str::to_string);
    let tree = tree.or_else(|| field("message_tree_id"));
    let missing = |name: &str| Problem {
        at: at.to_string(),
        tree: tree.clone().unwrap_or_default(),
        kind: "missing field",
        message: format!("column '{name}' is missing or not a string; tree left out"),
    };
    let id = field("message_id").ok_or_else(|| missing("message_id"))?;
    let role = field("role").ok_or_else(|| missing("role"))?;
    let text = field("text").ok_or_else(|| missing("text"))?;
    let quality = v
        .pointer("/labels/quality/value")
        .and_then(Value::as_f64)
        .or_else(|| parallel_label(v, "quality"));
    Ok(Message {
        parent: parent.map(str::to_string).or_else(|| field("parent_id")),
        tree: tree.unwrap_or_else(|| id.clone()),
        lang: field("lang").unwrap_or_default(),
        rank: v.get("rank").and_then(Value::as_i64),
        rejected: v.get("deleted").and_then(Value::as_bool) == Some(true)
            || v.get("review_result").and_then(Value::as_bool) == Some(false),
        quality,
        at: at.to_string(),
        id,
        role,
        text,
    })
}

/// Labels as the Hugging Face release writes them: `{"name": [...], "value": [...]}`.
fn parallel_label(v: &Value, label: &str) -> Option<f64> {
    let names = v.pointer("/labels/name")?.as_array()?;
    let values = v.pointer("/labels/value")?.as_array()?;
    let i = names.iter().position(|n| n.as_str() == Some(label))?;
    values.get(i)?.as_f64()
}

async fn read_parquet(input: &Path, problems: &mut Vec<Problem>) -> Result<Vec<Message>> {
    let name = input.display().to_string();
    let unreadable = |e: datafusion::error::DataFusionError| {
        Error::Job(format!(
            "seed input {name}: not a readable Parquet file ({e})"
        ))
    };
    let ctx = datafusion::prelude::SessionContext::new();
    let batches = ctx
        .read_parquet(input.to_string_lossy().as_ref(), Default::default())
        .await
        .map_err(unreadable)?
        .collect()
        .await
        .map_err(unreadable)?;
    let mut out = Vec::new();
    let mut row = 0;
    for batch in &batches {
        let columns = MessageColumns::new(batch)?;
        for r in 0..batch.num_rows() {
            row += 1;
            match columns.message(r, &format!("{name}:row {row}")) {
                Ok(m) => out.push(m),
                Err(p) => problems.push(p),
            }
        }
    }
    Ok(out)
}

/// The columns of one batch of the flat message table, each cast once.
struct MessageColumns {
    text: HashMap<&'static str, ArrayRef>,
    labels: Option<StructArray>,
}

impl MessageColumns {
    const TEXT: [&'static str; 9] = [
        "message_id",
        "parent_id",
        "message_tree_id",
        "role",
        "lang",
        "rank",
        "text",
        "deleted",
        "review_result",
    ];

    fn new(batch: &RecordBatch) -> Result<Self> {
        let mut text = HashMap::new();
        for name in Self::TEXT {
            if let Some(col) = batch.column_by_name(name) {
                text.insert(name, cast(col, &DataType::Utf8)?);
            }
        }
        let labels = batch
            .column_by_name("labels")
            .and_then(|c| c.as_struct_opt().cloned());
        Ok(Self { text, labels })
    }

    fn get(&self, name: &str, r: usize) -> Option<String> {
        let col = self.text.get(name)?.as_string::<i32>();
        (!col.is_null(r)).then(|| col.value(r).to_string())
    }

    /// The `quality` value among the labels, stored as parallel lists `name` and `value`.
    fn quality(&self, r: usize) -> Option<f64> {
        let labels = self.labels.as_ref().filter(|l| !l.is_null(r))?;
        let names = labels
            .column_by_name("name")?
            .as_list_opt::<i32>()?
            .value(r);
        let values = labels
            .column_by_name("value")?
            .as_list_opt::<i32>()?
            .value(r);
        let names = cast(&names, &DataType::Utf8).ok()?;
        let values = cast(&values, &DataType::Float64).ok()?;
        let i = names
            .as_string::<i32>()
            .iter()
            .position(|n| n == Some("quality"))?;
        let values = values.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        // The two lists may differ in length in a damaged file: a missing value is no value.
        (i < values.len() && !values.is_null(i)).then(|| values.value(i))
    }

    fn message(&self, r: usize, at: &str) -> std::result::Result<Message, Problem> {
        let tree = self.get("message_tree_id", r);
        let required = |name: &str| {
            self.get(name, r).ok_or_else(|| Problem {
                at: at.to_string(),
                tree: tree.clone().unwrap_or_default(),
                kind: "missing field",
                message: format!("column '{name}' is missing or null; tree left out"),
            })
        };
        let id = required("message_id")?;
        let flag = |name: &str| self.get(name, r).map(|v| v == "true");
        Ok(Message {
            parent: self.get("parent_id", r),
            tree: tree.clone().unwrap_or_else(|| id.clone()),
            role: required("role")?,
            lang: self.get("lang", r).unwrap_or_default(),
            rank: self
                .get("rank", r)
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| v as i64),
            text: required("text")?,
            rejected: flag("deleted") == Some(true) || flag("review_result") == Some(false),
            quality: self.quality(r),
            at: at.to_string(),
            id,
        })
    }
}

/// Trees that cannot be trusted: a duplicate id, an unknown role, a parent that is not in the
/// input, a prompt that is not a prompter's, or a cycle of parents. Each is reported once.
pub fn malformed_trees(messages: &[Message], problems: &mut Vec<Problem>) -> HashSet<String> {
    let mut bad = HashSet::new();
    let mut by_id: HashMap<&str, &Message> = HashMap::new();
    let mut report =
        |m: &Message, kind: &'static str, message: String, bad: &mut HashSet<String>| {
            if bad.insert(m.tree.clone()) {
                problems.push(Problem {
                    at: m.at.clone(),
                    tree: m.tree.clone(),
                    kind,
                    message: format!("{message}; tree left out"),
                });
            }
        };
    for m in messages {
        if by_id.insert(&m.id, m).is_some() {
            report(
                m,
                "duplicate id",
                format!("message id {} appears twice", m.id),
                &mut bad,
            );
        }
        if m.role != "prompter" && m.role != "assistant" {
            report(
                m,
                "unknown or misplaced role",
                format!(
                    "message {} has role '{}' (expected prompter or assistant)",
                    m.id, m.role
                ),
                &mut bad,
            );
        }
    }
    for m in messages {
        match &m.parent {
            Some(p) if !by_id.contains_key(p.as_str()) => {
                report(
                    m,
                    "missing parent",
                    format!(
                        "message {} names parent {p}, which is not in the input",
                        m.id
                    ),
                    &mut bad,
                );
            }
            None if m.role != "prompter" => {
                report(
                    m,
                    "unknown or misplaced role",
                    format!(
                        "tree starts with message {} by '{}', not a prompter",
                        m.id, m.role
                    ),
                    &mut bad,
                );
            }
            _ => {}
        }
        // Walk up to the root; coming back to a message already seen is a cycle.
        let mut seen = HashSet::from([m.id.as_str()]);
        let mut cur = m;
        while let Some(parent) = cur.parent.as_deref().and_then(|p| by_id.get(p)) {
            if !seen.insert(&parent.id) {
                report(
                    m,
                    "cycle",
                    format!("the parents of message {} form a cycle", m.id),
                    &mut bad,
                );
                break;
            }
            cur = parent;
        }
    }
    bad
}

/// First-turn English pairs whose reply is ranked 0, from well-formed trees, best quality
/// first (the sum of the two quality labels; ties by reply id, so the order is stable).
pub fn select(messages: &[Message], bad: &HashSet<String>, count: usize) -> (u64, Vec<SeedPair>) {
    let by_id: HashMap<&str, &Message> = messages.iter().map(|m| (m.id.as_str(), m)).collect();
    let mut pairs: Vec<SeedPair> = messages
        .iter()
        .filter(|r| r.role == "assistant" && r.rank == Some(0) && r.lang == "en" && !r.rejected)
        .filter(|r| !bad.contains(&r.tree))
        .filter_map(|r| {
            let p = by_id.get(r.parent.as_deref()?)?;
            let first_turn = p.parent.is_none() && p.role == "prompter";
            (first_turn && p.lang == "en" && !p.rejected).then(|| SeedPair {
                id: r.id.clone(),
                tree: r.tree.clone(),
                instruction: p.text.clone(),
                response: r.text.clone(),
                instruction_quality: p.quality,
                response_quality: r.quality,
            })
        })
        .collect();
    let eligible = pairs.len() as u64;
    let quality =
        |p: &SeedPair| p.instruction_quality.unwrap_or(0.0) + p.response_quality.unwrap_or(0.0);
    pairs.sort_by(|a, b| {
        quality(b)
            .total_cmp(&quality(a))
            .then_with(|| a.id.cmp(&b.id))
    });
    pairs.truncate(count);
    (eligible, pairs)
}

/// Selects seed pairs from `input` and writes them under `out`: `seed.parquet` (the pairs),
/// `forward.<ext>` (instruction -> response, to train the scorer and the forward model),
/// `backward.<ext>` (response -> instruction, to train the backward model) and
/// `seed_report.json` (counts and every problem).
pub async fn seed(input: &Path, out: &Path, count: usize, format: Format) -> Result<SeedReport> {
    let mut problems = Vec::new();
    let messages = read_messages(input, &mut problems).await?;
    let mut bad = malformed_trees(&messages, &mut problems);
    // A message that could not be read leaves its tree incomplete.
    bad.extend(
        problems
            .iter()
            .filter(|p| !p.tree.is_empty())
            .map(|p| p.tree.clone()),
    );
    let (eligible, pairs) = select(&messages, &bad, count);
    let trees: HashSet<&str> = messages.iter().map(|m| m.tree.as_str()).collect();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let forward: Vec<Pair> = pairs
        .iter()
        .map(|p| Pair::untagged(&p.id, &p.instruction, &p.response))
        .collect();
    let backward: Vec<Pair> = pairs
        .iter()
        .map(|p| Pair::untagged(&p.id, &p.response, &p.instruction))
        .collect();
    if format == Format::Hf {
        // Open Assistant's messages are Apache-2.0.
        for (direction, pairs, about) in [
            (
                "forward",
                &forward,
                "Open Assistant seed pairs, instruction to answer (for the scorer and the forward model).",
            ),
            (
                "backward",
                &backward,
                "Open Assistant seed pairs reversed, answer to instruction (for the backward model).",
            ),
        ] {
            for (file, bytes) in export::hf_pairs_folder(pairs, "apache-2.0", about)? {
                let path = out.join(direction).join(file);
                std::fs::create_dir_all(path.parent().expect("a folder"))
                    .with_context(|| format!("creating {}", path.display()))?;
                write(&path, bytes)?;
            }
        }
    } else {
        let ext = format.extension();
        write(
            &out.join(format!("forward.{ext}")),
            export::encode(&forward, format, TagMode::None)?,
        )?;
        write(
            &out.join(format!("backward.{ext}")),
            export::encode(&backward, format, TagMode::None)?,
        )?;
    }
    write(&out.join("seed.parquet"), seed_parquet(&pairs)?)?;
    let report = SeedReport {
        messages: messages.len() as u64,
        trees: trees.len() as u64,
        malformed_trees: bad.len() as u64,
        eligible,
        kept: pairs.len() as u64,
        problems,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
    write(&out.join("seed_report.json"), json)?;
    Ok(report)
}

fn write(path: &PathBuf, bytes: Vec<u8>) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn seed_parquet(pairs: &[SeedPair]) -> Result<Vec<u8>> {
    use datafusion::arrow::array::{Float64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use std::sync::Arc;
    let strings = |f: fn(&SeedPair) -> &str| -> Arc<dyn Array> {
        Arc::new(pairs.iter().map(|p| Some(f(p))).collect::<StringArray>())
    };
    let floats = |f: fn(&SeedPair) -> Option<f64>| -> Arc<dyn Array> {
        Arc::new(pairs.iter().map(f).collect::<Float64Array>())
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("tree", DataType::Utf8, true),
        Field::new("instruction", DataType::Utf8, true),
        Field::new("response", DataType::Utf8, true),
        Field::new("instruction_quality", DataType::Float64, true),
        Field::new("response_quality", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            strings(|p| &p.id),
            strings(|p| &p.tree),
            strings(|p| &p.instruction),
            strings(|p| &p.response),
            floats(|p| p.instruction_quality),
            floats(|p| p.response_quality),
        ],
    )?;
    parquet_of(&[batch], schema, None)
}

/// Problems counted by kind, for the summary line.
pub fn problem_summary(problems: &[Problem]) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for p in problems {
        *out.entry(p.kind).or_insert(0) += 1;
    }
    out
}
