//! An OpenAI-compatible fake server on 127.0.0.1 for tests: deterministic answers made from a
//! hash of the prompt, a fixed latency, request counters and a log of what it answered.

mod batch;

use batch::batch_api;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// One answered request.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub prompt: String,
    pub answer: String,
    pub started: Instant,
    pub finished: Instant,
}

#[derive(Default)]
pub struct FakeState {
    pub latency: Duration,
    /// Extra latency per generated token, with output lengths drawn from a heavy-tailed
    /// (Pareto) distribution by a hash of the prompt; zero for a fixed latency.
    pub per_token: Duration,
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    pub log: Mutex<Vec<Exchange>>,
    pub per_prompt: Mutex<HashMap<String, u64>>,
    /// (path, Authorization header) of every request.
    pub headers: Mutex<Vec<(String, Option<String>)>>,
    /// Prompts containing this text get HTTP 500.
    pub fail_if_contains: Mutex<Option<String>>,
    /// Prompts containing the text get a 200 whose body streams this many bytes (`None`:
    /// without end) until the client hangs up.
    pub stream_if_contains: Mutex<Vec<(String, Option<u64>)>>,
    /// Requests beyond this many in flight get HTTP 429 (a server at its capacity).
    pub capacity: Option<u64>,
    /// Requests answered with 429 for being over `capacity`.
    pub throttled: AtomicU64,
    /// The fake OpenAI Batch API: files, batches, and how batches end.
    pub batch: Mutex<FakeBatchApi>,
    /// Scripted faults: a request whose prompt contains the text gets the next fault of its
    /// list (then normal answers once the list is empty).
    pub faults: Mutex<Vec<(String, VecDeque<Fault>)>>,
    /// `/completions` logprobs in the chat shape (`logprobs.content[].top_logprobs`), as
    /// llama.cpp's server sends them, rather than OpenAI's legacy shape.
    pub completions_logprobs_chat_shape: std::sync::atomic::AtomicBool,
    /// Chat requests with a `response_format` get HTTP 500 (a server without JSON schemas).
    pub rejects_response_format: std::sync::atomic::AtomicBool,
    /// Chat requests asking `n` choices get one (llama-cpp-python's server).
    pub ignores_n: std::sync::atomic::AtomicBool,
    /// With `n`, `usage.completion_tokens` counts the first choice only (llama.cpp's server).
    pub usage_first_choice_only: std::sync::atomic::AtomicBool,
    /// How chat answers carry a reasoning model's thinking (none by default).
    pub thinking: Mutex<Option<Thinking>>,
    /// Every chat request body, when set (off by default: benches send millions).
    pub keep_bodies: bool,
    pub bodies: Mutex<Vec<Value>>,
}

/// A reasoning model's thinking, as servers send it.
#[derive(Debug, Clone)]
pub enum Thinking {
    /// `<think>TEXT</think>` opening the content (vLLM or SGLang without a reasoning parser).
    InContent(String),
    /// A `reasoning_content` field beside the content (a server with a reasoning parser).
    Field(String),
    /// `<think>TEXT` never closed, `finish_reason = length`: the limit was spent thinking.
    CutInContent(String),
}

/// State of the fake Batch API.
#[derive(Default)]
pub struct FakeBatchApi {
    pub files: HashMap<String, String>,
    /// Batch id -> (input file id, polls left before it ends).
    pub batches: HashMap<String, (String, u32)>,
    /// Lines whose prompt contains this fail the first time they are in a batch.
    pub fail_once: Option<String>,
    /// The next batch to end expires after answering only its first half.
    pub expire_next: bool,
    /// Custom ids that already failed once.
    pub failed: std::collections::HashSet<String>,
    /// Request lines of every batch created, in order.
    pub batch_sizes: Vec<usize>,
    /// When set, every batch reports this status when polled.
    pub status_override: Option<String>,
    /// Every batch created, in order: id, input file, metadata (what `GET /v1/batches`
    /// lists, newest first).
    pub created: Vec<(String, String, Value)>,
    /// The next batch created is created, and its reply is an HTTP 500 (a gateway that
    /// timed out after the API acted).
    pub lose_next_create_reply: bool,
}

/// A misbehaviour the fake can be scripted to show.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// HTTP 429 with an optional `Retry-After` in seconds.
    TooMany(Option<u32>),
    /// HTTP 429 with this `Retry-After` header value, whatever it says (`nan`, a date, ...).
    RetryAfter(String),
    /// HTTP 429 saying the quota is exhausted.
    Quota,
    /// The given 5xx status.
    Status(u16),
    /// The connection is closed without a response.
    Drop,
    /// The answer comes after this long.
    Slow(Duration),
    /// HTTP 200 with a body that is not a completion.
    Malformed,
    /// HTTP 200 with a chat completion whose content is this text.
    Content(String),
    /// HTTP 200 with this text cut off by the token limit (`finish_reason: length`).
    Cut(String),
    /// HTTP 307 to this URL (a redirect that re-posts the request there).
    Redirect(String),
    /// HTTP 200, a chat completion refused: `content: null`, with the model's words in
    /// `refusal` (`finish_reason: stop`, as OpenAI's structured outputs) or, without words,
    /// `finish_reason: content_filter` (a provider's filter).
    Refused(Option<String>),
    /// HTTP 200 with no choices but a `usage`: billed, and nothing to read.
    BilledEmpty,
    /// HTTP 200, the usual answer without `usage` (a server that does not report it).
    NoUsage,
}

/// A running fake server; it stops when the test process ends.
pub struct FakeServer {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
}

impl FakeServer {
    /// Starts a server answering after `latency`.
    pub fn start(latency: Duration) -> Self {
        Self::start_with(FakeState {
            latency,
            ..FakeState::default()
        })
    }

    /// Starts a server with the given behaviour.
    pub fn start_with(state: FakeState) -> Self {
        let state = Arc::new(state);
        let shared = Arc::clone(&state);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let (socket, _) = listener.accept().await.unwrap();
                    socket.set_nodelay(true).unwrap();
                    tokio::spawn(serve_connection(socket, Arc::clone(&shared)));
                }
            });
        });
        let addr = rx.recv().unwrap();
        FakeServer { addr, state }
    }

    /// Base URL to give backforth (`--endpoint`).
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn log(&self) -> Vec<Exchange> {
        self.state.log.lock().unwrap().clone()
    }

    /// Prompts that were sent more than once.
    pub fn repeated_prompts(&self) -> usize {
        self.state
            .per_prompt
            .lock()
            .unwrap()
            .values()
            .filter(|&&n| n > 1)
            .count()
    }
}

fn hash(s: &str) -> u64 {
    // FNV-1a: stable across runs and platforms.
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Output tokens the fake "generates" for `prompt`: Pareto with shape 1.5 from 20 tokens,
/// capped at 2,000, so most replies are short and a few are ten or a hundred times longer.
pub fn output_tokens(prompt: &str) -> u32 {
    let u = (hash(prompt) >> 11) as f64 / (1u64 << 53) as f64;
    (20.0 / (1.0 - u).max(1e-9).powf(1.0 / 1.5)).min(2000.0) as u32
}

/// How long the fake takes to answer `prompt`.
pub fn latency_for(state: &FakeState, prompt: &str) -> Duration {
    if state.per_token.is_zero() {
        state.latency
    } else {
        state.latency + state.per_token * output_tokens(prompt)
    }
}

/// The answer `model` gives to `prompt`: a model whose name ends in `m1` (Humpback's second
/// scorer) judges differently from the others, which all answer as [`answer_for`].
pub fn answer_as(model: &str, prompt: &str) -> String {
    if model.ends_with("m1") {
        answer_for(&format!("{prompt}\n(m1)"))
    } else {
        answer_for(prompt)
    }
}

/// The answer the fake gives to `prompt`, by what the prompt asks for.
pub fn answer_for(prompt: &str) -> String {
    let h = hash(prompt);
    if prompt.contains("Verdict: good") {
        match h % 8 {
            0 => "The instruction is vague.\nVerdict: bad".to_string(),
            1 => "Hard to say.".to_string(),
            _ => "Clear and complete.\nVerdict: good".to_string(),
        }
    } else if prompt.contains("Using the reference text") {
        let request = prompt.rsplit("Request:\n").next().unwrap_or("").trim();
        match h % 8 {
            0 => "I'm sorry, but I cannot help with that request.".to_string(),
            1 => format!("According to the text, {request}"),
            2 => "Yes.".to_string(),
            3 => "It depends. ".repeat(8),
            _ => format!("Polished answer ({:08x}) to: {request}", h as u32),
        }
    } else if prompt.contains("Score: N") {
        match h % 10 {
            // Reasoning that mentions other digits first; the last `Score:` must win.
            0 => "Between 2 and 3 points of detail are missing, so Score: 2 at first glance.\nScore: 4".to_string(),
            1 => "I cannot rate this pair.".to_string(),
            2 => "Good answer overall.\nScore: 4.5".to_string(),
            _ => format!("The answer is on topic.\nScore: {}", 1 + (h / 10) % 5),
        }
    } else if prompt.contains("[RES]") {
        let draft = prompt.rsplit("Draft response:\n").next().unwrap_or("");
        let first: String = draft
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(80)
            .collect();
        if h.is_multiple_of(7) {
            format!("Here is my rewrite: {first}")
        } else {
            format!(
                "Sure.\n[RES]\nRewritten ({:08x}): {first}\n[/RES]",
                h as u32
            )
        }
    } else if prompt.contains("most likely") {
        let text = prompt.rsplit("Text:\n").next().unwrap_or("");
        let words: Vec<&str> = text.split_whitespace().take(5).collect();
        format!("Instruction: Tell me about {}.", words.join(" "))
    } else {
        format!("Direct answer {:08x}.", h as u32)
    }
}

fn prompt_of(body: &Value) -> String {
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        messages
            .iter()
            .filter(|m| m["role"] == "user")
            .filter_map(|m| m["content"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        body["prompt"].as_str().unwrap_or_default().to_string()
    }
}

async fn respond(state: Arc<FakeState>, body: Value) -> String {
    let started = Instant::now();
    state.requests.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let prompt = prompt_of(&body);
    *state
        .per_prompt
        .lock()
        .unwrap()
        .entry(prompt.clone())
        .or_default() += 1;
    tokio::time::sleep(latency_for(&state, &prompt)).await;
    let answer = answer_to(&body, &prompt, body["seed"].as_u64());
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    state.log.lock().unwrap().push(Exchange {
        prompt,
        answer: answer.clone(),
        started,
        finished: Instant::now(),
    });
    answer
}

/// The answer to a request `body` asking `prompt`: JSON following its `response_format`
/// schema when it has one, else as [`answer_as`]; a `variant` (the request's seed, or a
/// choice's index) gives another sample.
pub fn answer_to(body: &Value, prompt: &str, variant: Option<u64>) -> String {
    let asked = match variant {
        Some(v) => format!("{prompt}\n(sample {v})"),
        None => prompt.to_string(),
    };
    match body.pointer("/response_format/json_schema/schema") {
        Some(schema) => json_following(schema, hash(&asked)).to_string(),
        None => answer_as(body["model"].as_str().unwrap_or_default(), &asked),
    }
}

/// A value following `schema` (objects, arrays, enums, bounded numbers), chosen by `h`.
pub fn json_following(schema: &Value, h: u64) -> Value {
    if let Some(options) = schema["enum"].as_array() {
        return options[(h % options.len() as u64) as usize].clone();
    }
    let bound = |key: &str, default: i64| schema[key].as_i64().unwrap_or(default);
    match schema["type"].as_str().unwrap_or("string") {
        "object" => {
            let mut out = serde_json::Map::new();
            if let Some(props) = schema["properties"].as_object() {
                for (i, (name, sub)) in props.iter().enumerate() {
                    out.insert(name.clone(), json_following(sub, hash(&format!("{h}{i}"))));
                }
            }
            Value::Object(out)
        }
        "array" => json!([json_following(&schema["items"], h), json_following(&schema["items"], h / 3)]),
        "integer" => {
            let (lo, hi) = (bound("minimum", 0), bound("maximum", 100));
            json!(lo + (h % (hi - lo + 1).max(1) as u64) as i64)
        }
        "number" => json!((h % 1000) as f64 / 1000.0),
        "boolean" => json!(h % 2 == 0),
        _ => json!(format!("fake text {:04x}", h & 0xffff)),
    }
}

/// What is wrong with a request's `response_format`, as a server would refuse it.
fn response_format_problem(body: &Value) -> Option<&'static str> {
    let format = body.get("response_format")?;
    if format["type"] != "json_schema" {
        return Some("response_format.type must be json_schema");
    }
    if !format["json_schema"]["name"].is_string() {
        return Some("response_format.json_schema.name is required");
    }
    if !format["json_schema"]["schema"].is_object() {
        return Some("response_format.json_schema.schema must be an object");
    }
    None
}

fn usage(prompt_len: usize, answer: &str) -> Value {
    let p = prompt_len / 4;
    let c = answer.len() / 4;
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// Serves HTTP/1.1 requests on one keep-alive connection until the client closes it.
/// One HTTP/1.1 request as the fake server reads it.
struct HttpRequest {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

/// Reads the next request of a keep-alive connection; `None` when the client is gone.
async fn read_request(
    stream: &mut tokio::io::BufReader<tokio::net::TcpStream>,
) -> Option<HttpRequest> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut request_line = String::new();
    if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
        return None;
    }
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let mut content_length = 0usize;
    let mut authorization = None;
    loop {
        let mut header = String::new();
        if stream.read_line(&mut header).await.unwrap_or(0) == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            }
        }
    }
    let mut body = vec![0u8; content_length];
    stream.read_exact(&mut body).await.ok()?;
    Some(HttpRequest {
        method,
        path,
        authorization,
        body,
    })
}

/// A whole response, head and body, to be sent in one write: a head and a body sent
/// separately meet Nagle's algorithm and the client's delayed ACK, adding 40 ms to every
/// reply.
fn http_response(status: &str, extra_headers: &str, payload: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{extra_headers}content-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    )
}

async fn serve_connection(socket: tokio::net::TcpStream, state: Arc<FakeState>) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::io::BufReader::new(socket);
    while let Some(request) = read_request(&mut stream).await {
        state
            .headers
            .lock()
            .unwrap()
            .push((request.path.clone(), request.authorization.clone()));
        let prompt = String::from_utf8_lossy(&request.body).into_owned();
        let streamed = state
            .stream_if_contains
            .lock()
            .unwrap()
            .iter()
            .find(|(needle, _)| prompt.contains(needle.as_str()))
            .map(|(_, bytes)| *bytes);
        if let Some(bytes) = streamed {
            state.requests.fetch_add(1, Ordering::SeqCst);
            stream_body(stream.get_mut(), bytes).await;
            return;
        }
        // `None`: an injected dropped connection.
        let Some(response) = answer_http(&state, &request).await else {
            return;
        };
        if stream
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Streams a 200 of `bytes` bytes of JSON-looking garbage (`None`: without end) until done or
/// the client hangs up.
async fn stream_body(socket: &mut tokio::net::TcpStream, bytes: Option<u64>) {
    use tokio::io::AsyncWriteExt;
    let length = bytes.unwrap_or(u64::MAX / 2);
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0u64;
    while sent < length {
        let n = chunk.len().min((length - sent) as usize);
        if socket.write_all(&chunk[..n]).await.is_err() {
            return;
        }
        sent += n as u64;
    }
}

/// The response to `http`, or `None` to drop the connection.
async fn answer_http(state: &Arc<FakeState>, http: &HttpRequest) -> Option<String> {
    if let Some((status, payload)) = batch_api(state, &http.method, &http.path, &http.body) {
        return Some(http_response(status, "", &payload));
    }
    let request: Option<Value> = serde_json::from_slice(&http.body).ok();
    if let Some(fault) = next_fault(state, request.as_ref()) {
        return fault_response(state, fault, &http.path, request.as_ref()).await;
    }
    let failing = state.fail_if_contains.lock().unwrap().clone();
    if let (Some(needle), Some(req)) = (&failing, &request)
        && prompt_of(req).contains(needle.as_str())
    {
        state.requests.fetch_add(1, Ordering::SeqCst);
        let payload = r#"{"error":{"message":"injected failure"}}"#;
        return Some(http_response("500 Internal Server Error", "", payload));
    }
    let (status, reply) = match request {
        Some(request)
            if http.path.ends_with("/chat/completions")
                && request.get("response_format").is_some()
                && state.rejects_response_format.load(Ordering::SeqCst) =>
        {
            state.requests.fetch_add(1, Ordering::SeqCst);
            (
                "500 Internal Server Error",
                json!({"error": {"message": "unsupported"}}),
            )
        }
        Some(request) if http.path.ends_with("/chat/completions") => {
            match response_format_problem(&request) {
                Some(problem) => (
                    "400 Bad Request",
                    json!({"error": {"message": problem, "type": "invalid_request_error"}}),
                ),
                None => ("200 OK", chat(Arc::clone(state), request).await),
            }
        }
        Some(request) if http.path.ends_with("/completions") => {
            ("200 OK", completions(Arc::clone(state), request).await)
        }
        _ => (
            "404 Not Found",
            json!({"error": {"message": "unknown route or bad JSON"}}),
        ),
    };
    Some(http_response(status, "", &reply.to_string()))
}

/// The fault injected for this request: a 429 when the server is at capacity, else the next
/// fault queued for a prompt it contains.
fn next_fault(state: &FakeState, request: Option<&Value>) -> Option<Fault> {
    let queued = request.and_then(|req| {
        let prompt = prompt_of(req);
        let mut faults = state.faults.lock().unwrap();
        faults
            .iter_mut()
            .find(|(needle, _)| prompt.contains(needle.as_str()))
            .and_then(|(_, list)| list.pop_front())
    });
    let over_capacity = state
        .capacity
        .is_some_and(|c| state.in_flight.load(Ordering::SeqCst) >= c);
    if over_capacity {
        state.throttled.fetch_add(1, Ordering::SeqCst);
        return Some(Fault::TooMany(None));
    }
    queued
}

/// The response of an injected fault (counted as a request), or `None` to drop the
/// connection.
async fn fault_response(
    state: &FakeState,
    fault: Fault,
    path: &str,
    request: Option<&Value>,
) -> Option<String> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(req) = request {
        *state
            .per_prompt
            .lock()
            .unwrap()
            .entry(prompt_of(req))
            .or_default() += 1;
    }
    Some(match fault {
        Fault::TooMany(after) => {
            let header = after
                .map(|s| format!("retry-after: {s}\r\n"))
                .unwrap_or_default();
            http_response(
                "429 Too Many Requests",
                &header,
                r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
            )
        }
        Fault::RetryAfter(value) => http_response(
            "429 Too Many Requests",
            &format!("retry-after: {value}\r\n"),
            r#"{"error":{"message":"slow down"}}"#,
        ),
        Fault::Quota => http_response(
            "429 Too Many Requests",
            "",
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
        ),
        Fault::Status(code) => http_response(
            &format!("{code} Fault"),
            "",
            r#"{"error":{"message":"injected"}}"#,
        ),
        Fault::Drop => return None,
        Fault::Slow(wait) => {
            tokio::time::sleep(wait).await;
            let prompt = request.map(prompt_of).unwrap_or_default();
            let answer = answer_for(&prompt);
            let body = if path.ends_with("/chat/completions") {
                chat_json(prompt.len(), &answer)
            } else {
                completion_json(prompt.len(), &answer)
            };
            http_response("200 OK", "", &body.to_string())
        }
        Fault::Malformed => http_response("200 OK", "", r#"{"choices": "not a list"#),
        Fault::Content(text) => {
            let prompt = request.map(prompt_of).unwrap_or_default();
            http_response("200 OK", "", &chat_json(prompt.len(), &text).to_string())
        }
        Fault::Redirect(to) => http_response(
            "307 Temporary Redirect",
            &format!("location: {to}\r\n"),
            r#"{"error":{"message":"moved"}}"#,
        ),
        Fault::Cut(text) => {
            let prompt = request.map(prompt_of).unwrap_or_default();
            let mut reply = chat_json(prompt.len(), &text);
            reply["choices"][0]["finish_reason"] = json!("length");
            http_response("200 OK", "", &reply.to_string())
        }
        Fault::BilledEmpty => {
            let prompt = request.map(prompt_of).unwrap_or_default();
            let mut reply = chat_json(prompt.len(), "");
            reply["choices"] = json!([]);
            http_response("200 OK", "", &reply.to_string())
        }
        Fault::NoUsage => {
            let prompt = request.map(prompt_of).unwrap_or_default();
            let mut reply = chat_json(prompt.len(), &answer_for(&prompt));
            reply.as_object_mut().unwrap().remove("usage");
            http_response("200 OK", "", &reply.to_string())
        }
        Fault::Refused(words) => {
            let prompt = request.map(prompt_of).unwrap_or_default();
            let mut reply = chat_json(prompt.len(), "");
            let choice = &mut reply["choices"][0];
            choice["message"]["content"] = Value::Null;
            match words {
                Some(words) => choice["message"]["refusal"] = json!(words),
                None => choice["finish_reason"] = json!("content_filter"),
            }
            reply["usage"]["completion_tokens"] = json!(12);
            http_response("200 OK", "", &reply.to_string())
        }
    })
}

async fn chat(state: Arc<FakeState>, body: Value) -> Value {
    if state.keep_bodies {
        state.bodies.lock().unwrap().push(body.clone());
    }
    let len = prompt_of(&body).len();
    let wants_logprobs = body["logprobs"] == json!(true);
    let prompt = prompt_of(&body);
    let thinking = state.thinking.lock().unwrap().clone();
    let choices = match state.ignores_n.load(Ordering::SeqCst) {
        true => 1,
        false => body["n"].as_u64().unwrap_or(1),
    };
    let first_only = state.usage_first_choice_only.load(Ordering::SeqCst);
    let asked = body.clone();
    let answer = respond(state, body).await;
    if choices > 1 {
        let answers: Vec<String> = std::iter::once(answer)
            .chain((1..choices).map(|i| answer_to(&asked, &prompt, Some(i))))
            .collect();
        let mut reply = chat_json(len, &answers[0]);
        reply["choices"] = answers
            .iter()
            .enumerate()
            .map(|(i, a)| json!({"index": i, "message": {"role": "assistant", "content": a}, "finish_reason": "stop"}))
            .collect();
        let completion: usize = match first_only {
            true => answers[0].len() / 4,
            false => answers.iter().map(|a| a.len() / 4).sum(),
        };
        reply["usage"] = json!({"prompt_tokens": len / 4, "completion_tokens": completion, "total_tokens": len / 4 + completion});
        return reply;
    }
    if wants_logprobs {
        let top = first_token_alternatives(&prompt);
        let first = top[0].0.clone();
        let mut reply = chat_json(len, &first);
        reply["choices"][0]["logprobs"] = json!({"content": [{
            "token": first, "logprob": top[0].1,
            "top_logprobs": top.iter().map(|(t, l)| json!({"token": t, "logprob": l})).collect::<Vec<_>>(),
        }]});
        reply["choices"][0]["finish_reason"] = json!("length");
        return reply;
    }
    let Some(thinking) = thinking else {
        return chat_json(len, &answer);
    };
    let (content, thought) = match &thinking {
        Thinking::InContent(t) => (format!("<think>\n{t}\n</think>\n\n{answer}"), t),
        Thinking::Field(t) => (answer.clone(), t),
        Thinking::CutInContent(t) => (format!("<think>\n{t}"), t),
    };
    let mut reply = chat_json(len, &content);
    if let Thinking::Field(t) = &thinking {
        reply["choices"][0]["message"]["reasoning_content"] = json!(t);
    }
    if let Thinking::CutInContent(_) = &thinking {
        reply["choices"][0]["finish_reason"] = json!("length");
    }
    let usage = &mut reply["usage"];
    usage["completion_tokens"] = json!((answer.len() + thought.len()) / 4);
    usage["completion_tokens_details"] = json!({"reasoning_tokens": thought.len() / 4});
    usage["prompt_tokens_details"] = json!({"cached_tokens": len / 8});
    reply
}

/// The most likely first tokens the fake offers when asked for logprobs: a judge leaning to one
/// digit, or (for one prompt in six) words and no digit at all.
pub fn first_token_alternatives(prompt: &str) -> Vec<(String, f64)> {
    let h = hash(prompt);
    if h.is_multiple_of(6) {
        return vec![
            ("The".into(), -0.2),
            ("I".into(), -1.9),
            ("This".into(), -2.5),
        ];
    }
    if h % 6 == 1 {
        // A digit among the alternatives, but holding 7% of the probability: no score.
        return vec![
            ("The".into(), -0.1),
            ("4".into(), -2.7),
            ("I".into(), -3.0),
        ];
    }
    let best = 1 + (h / 6) % 5;
    let mut top: Vec<(String, f64)> = (1..=5u64)
        .map(|d| {
            let p: f64 = if d == best {
                0.6
            } else if d.abs_diff(best) == 1 {
                0.15
            } else {
                0.03
            };
            (d.to_string(), p.ln())
        })
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top
}

fn chat_json(len: usize, answer: &str) -> Value {
    json!({
        "id": "fake", "object": "chat.completion", "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": usage(len, answer),
    })
}

async fn completions(state: Arc<FakeState>, body: Value) -> Value {
    let len = prompt_of(&body).len();
    let prompt = prompt_of(&body).to_string();
    let wants_logprobs = body["logprobs"].as_u64().is_some_and(|n| n > 0);
    let chat_shape = state
        .completions_logprobs_chat_shape
        .load(Ordering::SeqCst);
    let answer = respond(state, body).await;
    if !wants_logprobs {
        return completion_json(len, &answer);
    }
    let top = first_token_alternatives(&prompt);
    let first = top[0].0.clone();
    let mut reply = completion_json(len, &first);
    reply["choices"][0]["logprobs"] = if chat_shape {
        json!({"content": [{
            "token": first, "logprob": top[0].1,
            "top_logprobs": top.iter().map(|(t, l)| json!({"token": t, "logprob": l})).collect::<Vec<_>>(),
        }]})
    } else {
        let alternatives: serde_json::Map<String, Value> =
            top.iter().map(|(t, l)| (t.clone(), json!(l))).collect();
        json!({"tokens": [first], "token_logprobs": [top[0].1], "top_logprobs": [alternatives]})
    };
    reply["choices"][0]["finish_reason"] = json!("length");
    reply
}

fn completion_json(len: usize, answer: &str) -> Value {
    json!({
        "id": "fake", "object": "text_completion", "model": "fake",
        "choices": [{"index": 0, "text": answer, "finish_reason": "stop"}],
        "usage": usage(len, answer),
    })
}
