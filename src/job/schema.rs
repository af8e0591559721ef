//! Structured output: a function's JSON Schema, sent as `response_format`, checked on every
//! reply (so a server without guided decoding is held to it too), and mapped to the Arrow
//! type SQL reads the value as.
//!
//! Only the keywords below are checked here; `description`, `title`, `default`, `examples`,
//! `format` and `pattern` go to the server untouched, and anything else is refused when the
//! job is read, so no rule is silently unchecked.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, ListArray, NullArray, StringBuilder,
    StructArray,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::job_error;
use crate::parse::unfenced;

use crate::prepare::ingest::json_kind;

/// Keywords checked against each reply.
const CHECKED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "anyOf",
];

/// Keywords that only inform the model, or that the server's guided decoding enforces.
const PASSED_ON: &[&str] = &[
    "description",
    "title",
    "default",
    "examples",
    "format",
    "pattern",
    "$schema",
];

/// A JSON Schema an LLM function's replies must follow.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JsonSchema {
    /// Name sent with it (OpenAI requires one): the function's.
    name: String,
    /// The schema as written.
    schema: Value,
}

impl JsonSchema {
    /// The schema `[functions.NAME] json_schema` gives: a table, or the path of a JSON file
    /// under the job's folder.
    pub(super) fn read(
        name: &str,
        given: &toml::Value,
        dir: &super::trust::JobDir,
    ) -> Result<JsonSchema> {
        let value = match given {
            toml::Value::String(path) => {
                let (path, text) = dir.read(path, &format!("[functions.{name}] json_schema"))?;
                serde_json::from_str(&text).map_err(|e| {
                    Error::Job(format!(
                        "[functions.{name}] json_schema {}: not JSON ({e})",
                        path.display()
                    ))
                })?
            }
            toml::Value::Table(table) => serde_json::to_value(table)
                .map_err(|e| Error::Job(format!("[functions.{name}] json_schema: {e}")))?,
            _ => {
                return job_error!(
                    "[functions.{name}] json_schema must be a table or the path of a .json file"
                );
            }
        };
        JsonSchema::new(name, value)
            .map_err(|e| Error::Job(format!("[functions.{name}] json_schema: {e}")))
    }

    /// The schema `schema` under `name`, refused with the path of the first keyword this
    /// module cannot check (`$ref`, `oneOf`, ...), or a root that is not an object.
    pub fn new(name: &str, schema: Value) -> Result<Self, String> {
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(
                "the root must be an object (`type = \"object\"` with `properties`): servers \
                 return a JSON object, and SQL reads its fields"
                    .to_string(),
            );
        }
        check_keywords(&schema, "")?;
        Ok(Self {
            name: name.to_string(),
            schema,
        })
    }

    /// The built-in schema of `mode = "json"` scoring: a reason, then a score from 1 to 5.
    pub fn score(name: &str) -> Self {
        let schema = json!({
            "type": "object",
            "properties": {
                "reason": {"type": "string", "description": "a brief explanation of the judgement"},
                "score": {"type": "integer", "minimum": 1, "maximum": 5},
            },
            "required": ["reason", "score"],
            "additionalProperties": false,
        });
        Self::new(name, schema).expect("a valid schema")
    }

    /// The request's `response_format`. OpenAI's strict mode needs every property required
    /// and no other properties allowed; a schema that is looser is sent as not strict, which
    /// vLLM and SGLang enforce all the same.
    pub fn response_format(&self) -> Value {
        json!({
            "type": "json_schema",
            "json_schema": {
                "name": self.name,
                "strict": is_strict(&self.schema),
                "schema": self.schema,
            }
        })
    }

    /// The value of a reply, or what is wrong with it (sent back to the model on a retry).
    /// A reply wrapped in one Markdown code fence is read inside the fence.
    pub fn check(&self, text: &str) -> Result<Value, String> {
        let body = unfenced(text);
        let value: Value =
            serde_json::from_str(body).map_err(|e| format!("the reply is not valid JSON ({e})"))?;
        validate(&self.schema, &value, "")?;
        Ok(value)
    }

    /// The Arrow type the value is stored as: objects as structs, arrays as lists, and JSON
    /// text for anything with no single type (`anyOf` over different types, free objects).
    pub fn arrow_type(&self) -> DataType {
        arrow_type(&self.schema)
    }

    /// A value that follows the schema, chosen by `seed` (the offline mock's answer).
    pub fn example(&self, seed: u64) -> Value {
        example(&self.schema, seed)
    }
}

fn check_keywords(schema: &Value, at: &str) -> Result<(), String> {
    let Some(map) = schema.as_object() else {
        return Err(format!("{}: a schema must be a table", shown(at)));
    };
    for (key, value) in map {
        if PASSED_ON.contains(&key.as_str()) {
            continue;
        }
        if !CHECKED.contains(&key.as_str()) {
            return Err(format!(
                "{}: keyword `{key}` is not supported (use {}; inline what `$ref` points to)",
                shown(at),
                CHECKED.join(", ")
            ));
        }
        match key.as_str() {
            "properties" => {
                let Some(props) = value.as_object() else {
                    return Err(format!("{at}/properties: must be a table"));
                };
                for (name, sub) in props {
                    check_keywords(sub, &format!("{at}/properties/{name}"))?;
                }
            }
            "items" | "additionalProperties" if value.is_object() => {
                check_keywords(value, &format!("{at}/{key}"))?
            }
            "anyOf" => {
                let Some(branches) = value.as_array() else {
                    return Err(format!("{at}/anyOf: must be a list of schemas"));
                };
                for (i, sub) in branches.iter().enumerate() {
                    check_keywords(sub, &format!("{at}/anyOf/{i}"))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn shown(at: &str) -> &str {
    if at.is_empty() { "the schema" } else { at }
}

fn is_strict(schema: &Value) -> bool {
    let Some(map) = schema.as_object() else {
        return true;
    };
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        let required: Vec<&str> = map
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let closed = map.get("additionalProperties") == Some(&Value::Bool(false));
        if !closed || props.keys().any(|k| !required.contains(&k.as_str())) {
            return false;
        }
        if !props.values().all(is_strict) {
            return false;
        }
    }
    let nested = |key: &str| map.get(key).is_none_or(is_strict);
    let branches = map
        .get("anyOf")
        .and_then(Value::as_array)
        .is_none_or(|b| b.iter().all(is_strict));
    nested("items") && branches
}

/// The JSON type names `value` answers to (an integer is also a number).
fn is_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
        _ => false,
    }
}

fn types(schema: &Map<String, Value>) -> Vec<&str> {
    match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn validate(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let Some(s) = schema.as_object() else {
        return Ok(());
    };
    let place = if at.is_empty() { "the reply" } else { at };
    let allowed = types(s);
    if !allowed.is_empty() && !allowed.iter().any(|t| is_type(value, t)) {
        return Err(format!(
            "{place} must be {}, not {}",
            allowed.join(" or "),
            brief(value)
        ));
    }
    if let Some(options) = s.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        return Err(format!(
            "{place} must be one of {}, not {}",
            Value::Array(options.clone()),
            brief(value)
        ));
    }
    if let Some(constant) = s.get("const")
        && constant != value
    {
        return Err(format!("{place} must be {constant}, not {}", brief(value)));
    }
    if let Some(branches) = s.get("anyOf").and_then(Value::as_array) {
        let errors: Vec<String> = branches
            .iter()
            .filter_map(|b| validate(b, value, at).err())
            .collect();
        if errors.len() == branches.len() {
            return Err(format!(
                "{place} matches none of the allowed forms ({})",
                errors.join("; ")
            ));
        }
    }
    if let Some(n) = value.as_f64() {
        bounds(s, n, place)?;
    }
    if let Some(text) = value.as_str() {
        let chars = text.chars().count() as f64;
        limit(s, "minLength", chars, place, "characters", |n, m| n >= m)?;
        limit(s, "maxLength", chars, place, "characters", |n, m| n <= m)?;
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as f64;
        limit(s, "minItems", len, place, "items", |n, m| n >= m)?;
        limit(s, "maxItems", len, place, "items", |n, m| n <= m)?;
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item_schema, item, &format!("{at}/{i}"))?;
            }
        }
    }
    if let Some(object) = value.as_object() {
        validate_object(s, object, at)?;
    }
    Ok(())
}

fn validate_object(
    s: &Map<String, Value>,
    object: &Map<String, Value>,
    at: &str,
) -> Result<(), String> {
    let props = s.get("properties").and_then(Value::as_object);
    for name in s
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(name) = name.as_str()
            && !object.contains_key(name)
        {
            return Err(format!("{at}/{name} is required but missing"));
        }
    }
    for (name, item) in object {
        match props.and_then(|p| p.get(name)) {
            Some(sub) => validate(sub, item, &format!("{at}/{name}"))?,
            None => match s.get("additionalProperties") {
                Some(Value::Bool(false)) => {
                    return Err(format!("{at}/{name} is not a property the schema allows"));
                }
                Some(extra @ Value::Object(_)) => validate(extra, item, &format!("{at}/{name}"))?,
                _ => {}
            },
        }
    }
    Ok(())
}

fn bounds(s: &Map<String, Value>, n: f64, place: &str) -> Result<(), String> {
    let bound = |key: &str| s.get(key).and_then(Value::as_f64);
    let checks = [
        (
            "minimum",
            bound("minimum"),
            n >= bound("minimum").unwrap_or(f64::MIN),
            "at least",
        ),
        (
            "maximum",
            bound("maximum"),
            n <= bound("maximum").unwrap_or(f64::MAX),
            "at most",
        ),
        (
            "exclusiveMinimum",
            bound("exclusiveMinimum"),
            n > bound("exclusiveMinimum").unwrap_or(f64::MIN),
            "above",
        ),
        (
            "exclusiveMaximum",
            bound("exclusiveMaximum"),
            n < bound("exclusiveMaximum").unwrap_or(f64::MAX),
            "below",
        ),
    ];
    for (_, limit, ok, words) in checks {
        if let Some(limit) = limit
            && !ok
        {
            return Err(format!("{place} must be {words} {limit}, not {n}"));
        }
    }
    Ok(())
}

fn limit(
    s: &Map<String, Value>,
    key: &str,
    n: f64,
    place: &str,
    unit: &str,
    ok: fn(f64, f64) -> bool,
) -> Result<(), String> {
    match s.get(key).and_then(Value::as_f64) {
        Some(m) if !ok(n, m) => {
            let words = if key.starts_with("min") {
                "at least"
            } else {
                "at most"
            };
            Err(format!("{place} must have {words} {m} {unit}, not {n}"))
        }
        _ => Ok(()),
    }
}

/// A short rendering of a value for messages: its type and up to 60 characters of it.
fn brief(value: &Value) -> String {
    let text = value.to_string();
    let cut: String = text.chars().take(60).collect();
    let kind = json_kind(value);
    if cut.len() < text.len() {
        format!("{kind} ({cut}…)")
    } else {
        format!("{kind} ({cut})")
    }
}

fn arrow_type(schema: &Value) -> DataType {
    let Some(s) = schema.as_object() else {
        return DataType::Utf8;
    };
    if let Some(branches) = s.get("anyOf").and_then(Value::as_array) {
        let mapped: Vec<DataType> = branches
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) != Some("null"))
            .map(arrow_type)
            .collect();
        return match mapped.split_first() {
            Some((first, rest)) if rest.iter().all(|t| t == first) => first.clone(),
            _ => DataType::Utf8,
        };
    }
    let named: Vec<&str> = types(s).into_iter().filter(|t| *t != "null").collect();
    match named.as_slice() {
        ["integer"] => DataType::Int64,
        ["number"] | ["integer", "number"] | ["number", "integer"] => DataType::Float64,
        ["boolean"] => DataType::Boolean,
        ["array"] => match s.get("items") {
            Some(items) => DataType::List(Arc::new(Field::new("item", arrow_type(items), true))),
            None => DataType::Utf8,
        },
        ["object"] => match s.get("properties").and_then(Value::as_object) {
            Some(props) if !props.is_empty() => DataType::Struct(
                props
                    .iter()
                    .map(|(name, sub)| Field::new(name, arrow_type(sub), true))
                    .collect::<Fields>(),
            ),
            _ => DataType::Utf8,
        },
        _ => DataType::Utf8,
    }
}

/// The column of `values` as `data_type` (from [`JsonSchema::arrow_type`]); a missing
/// value, or one of another shape, is NULL, and a text column holds any value as JSON text.
pub fn json_array(data_type: &DataType, values: &[Option<&Value>]) -> ArrayRef {
    fn present<'a>(v: &Option<&'a Value>) -> Option<&'a Value> {
        v.filter(|v| !v.is_null())
    }
    match data_type {
        DataType::Int64 => Arc::new(
            values
                .iter()
                .map(|v| present(v).and_then(Value::as_i64))
                .collect::<Int64Array>(),
        ),
        DataType::Float64 => Arc::new(
            values
                .iter()
                .map(|v| present(v).and_then(Value::as_f64))
                .collect::<Float64Array>(),
        ),
        DataType::Boolean => Arc::new(
            values
                .iter()
                .map(|v| present(v).and_then(Value::as_bool))
                .collect::<BooleanArray>(),
        ),
        DataType::Struct(fields) => {
            let objects: Vec<Option<&Map<String, Value>>> = values
                .iter()
                .map(|v| present(v).and_then(Value::as_object))
                .collect();
            let children = fields
                .iter()
                .map(|f| {
                    let inner: Vec<Option<&Value>> = objects
                        .iter()
                        .map(|o| o.and_then(|o| o.get(f.name())))
                        .collect();
                    json_array(f.data_type(), &inner)
                })
                .collect();
            let nulls = NullBuffer::from(objects.iter().map(Option::is_some).collect::<Vec<_>>());
            Arc::new(StructArray::new(fields.clone(), children, Some(nulls)))
        }
        DataType::List(item) => {
            let lists: Vec<Option<&Vec<Value>>> = values
                .iter()
                .map(|v| present(v).and_then(Value::as_array))
                .collect();
            let flat: Vec<Option<&Value>> = lists
                .iter()
                .flatten()
                .flat_map(|l| l.iter().map(Some))
                .collect();
            let offsets = OffsetBuffer::from_lengths(lists.iter().map(|l| l.map_or(0, Vec::len)));
            let nulls = NullBuffer::from(lists.iter().map(Option::is_some).collect::<Vec<_>>());
            Arc::new(ListArray::new(
                Arc::clone(item),
                offsets,
                json_array(item.data_type(), &flat),
                Some(nulls),
            ))
        }
        DataType::Null => Arc::new(NullArray::new(values.len())),
        _ => {
            let mut b = StringBuilder::with_capacity(values.len(), 0);
            for v in values {
                match present(v) {
                    Some(Value::String(s)) => b.append_value(s),
                    Some(other) => b.append_value(other.to_string()),
                    None => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
    }
}

fn example(schema: &Value, seed: u64) -> Value {
    let Some(s) = schema.as_object() else {
        return Value::Null;
    };
    if let Some(options) = s
        .get("enum")
        .and_then(Value::as_array)
        .filter(|o| !o.is_empty())
    {
        return options[(seed % options.len() as u64) as usize].clone();
    }
    if let Some(constant) = s.get("const") {
        return constant.clone();
    }
    if let Some(branches) = s
        .get("anyOf")
        .and_then(Value::as_array)
        .filter(|b| !b.is_empty())
    {
        return example(&branches[0], seed);
    }
    let kind = types(s)
        .into_iter()
        .find(|t| *t != "null")
        .unwrap_or("null");
    let bound = |key: &str, default: f64| s.get(key).and_then(Value::as_f64).unwrap_or(default);
    match kind {
        "object" => {
            let props = s.get("properties").and_then(Value::as_object);
            let map: Map<String, Value> = props
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, (name, sub))| {
                    (
                        name.clone(),
                        example(sub, seed.rotate_left(7 * i as u32 + 3)),
                    )
                })
                .collect();
            Value::Object(map)
        }
        "array" => {
            let count = bound("minItems", 1.0).max(1.0) as u64;
            let items = s.get("items").cloned().unwrap_or(json!({"type": "string"}));
            Value::Array(
                (0..count)
                    .map(|i| example(&items, seed.wrapping_add(i)))
                    .collect(),
            )
        }
        "integer" => {
            let (lo, hi) = (bound("minimum", 0.0) as i64, bound("maximum", 100.0) as i64);
            json!(lo + (seed % (hi - lo + 1).max(1) as u64) as i64)
        }
        "number" => {
            let (lo, hi) = (bound("minimum", 0.0), bound("maximum", 1.0));
            json!(lo + (hi - lo) * ((seed % 1000) as f64 / 1000.0))
        }
        "boolean" => json!(seed % 2 == 0),
        "string" => {
            let min = bound("minLength", 0.0) as usize;
            let text = format!("value {:04x}", seed & 0xffff);
            json!(format!("{text:min$}"))
        }
        _ => Value::Null,
    }
}
