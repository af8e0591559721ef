//! The OpenAI Batch API: a stage's requests uploaded as files of at most 50,000 lines and
//! 200 MB, batches created and polled, results and partial results (expired batches) recorded
//! in the journal by request key, and what failed or expired resubmitted. Batch ids are
//! written under the output root as soon as they exist, so a restarted command resumes polling
//! instead of paying again; and each batch carries a digest of its requests in its metadata,
//! so one created by a command that died before recording it is found and adopted, not
//! created twice.

use std::time::Duration;

use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Context, Error, Result};
use crate::escape::escape_control;
use crate::execution_error;
use crate::job::Job;
use crate::run::batch::{ResultLines, capture_stage_requests, import_batch_results, result_lines};
use crate::storage::Location;

/// Most request lines in one uploaded file (the API's limit).
pub const MAX_LINES: usize = 50_000;
/// Most bytes in one uploaded file (the API's limit).
pub const MAX_BYTES: usize = 200 * 1024 * 1024;
/// Rounds of resubmitting what failed or expired before giving up.
const MAX_ROUNDS: usize = 3;

/// One batch as recorded under `<root>/_batches/<stage>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// Batch id given by the API.
    pub id: String,
    /// Id of the uploaded request file.
    pub input_file_id: String,
    /// Requests in the file.
    pub requests: usize,
    /// `submitted` until its results are in the journal, then the final API status.
    pub state: String,
    /// Digest of the request file, also in the batch's metadata (`backforth_requests`).
    #[serde(default)]
    pub digest: String,
}

/// Metadata key of a batch holding the digest of its request file.
const DIGEST_KEY: &str = "backforth_requests";
/// Batches listed, newest first, when looking for one a dead command created.
const LISTED_AT_MOST: usize = 1000;

/// What a `batch submit` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SubmitSummary {
    /// Batches created by this command.
    pub batches_created: usize,
    /// Responses recorded in the journal.
    pub recorded: u64,
    /// Requests still unanswered after every round.
    pub unanswered: usize,
}

struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Api {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}/{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn json(&self, r: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        let response = r
            .send()
            .await
            .with_context(|| format!("Batch API, {what}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("Batch API, {what}"))?;
        if !status.is_success() {
            return Err(Error::Execution(format!(
                "Batch API, {what}: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        serde_json::from_str(&text).with_context(|| format!("Batch API, {what}: malformed reply"))
    }

    /// Uploads a JSONL file with purpose `batch`; multipart written by hand (reqwest's
    /// multipart feature would rebuild the whole object_store/DataFusion stack).
    async fn upload(&self, jsonl: Vec<u8>) -> Result<String> {
        let boundary = format!("backforth-{:016x}", fastrand::u64(..));
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"requests.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .into_bytes();
        body.extend(jsonl);
        body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
        let r = self
            .request(reqwest::Method::POST, "files")
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body);
        let v = self.json(r, "uploading requests").await?;
        id_of(&v, "uploading requests")
    }

    async fn create(&self, file_id: &str, endpoint: &str, digest: &str) -> Result<String> {
        let r = self.request(reqwest::Method::POST, "batches").json(&json!({
            "input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
            "metadata": { DIGEST_KEY: digest },
        }));
        let v = self.json(r, "creating a batch").await?;
        id_of(&v, "creating a batch")
    }

    /// A batch of requests `digest` that is not in `known` and has not failed, expired or
    /// been cancelled, among the latest [`LISTED_AT_MOST`]: (its id, its input file).
    async fn find(&self, digest: &str, known: &[BatchRecord]) -> Result<Option<(String, String)>> {
        let mut after: Option<String> = None;
        let mut listed = 0;
        while listed < LISTED_AT_MOST {
            let path = match &after {
                Some(id) => format!("batches?limit=100&after={id}"),
                None => "batches?limit=100".to_string(),
            };
            let page = self
                .json(self.request(reqwest::Method::GET, &path), "listing batches")
                .await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            listed += data.len();
            for batch in &data {
                let id = batch["id"].as_str().unwrap_or_default();
                let ended_badly = matches!(
                    batch["status"].as_str(),
                    Some("failed" | "expired" | "cancelled" | "cancelling")
                );
                if batch["metadata"][DIGEST_KEY].as_str() == Some(digest)
                    && !ended_badly
                    && !known.iter().any(|r| r.id == id)
                {
                    let file = batch["input_file_id"].as_str().unwrap_or_default();
                    return Ok(Some((id.to_string(), file.to_string())));
                }
            }
            after = data
                .last()
                .and_then(|b| b["id"].as_str())
                .map(str::to_string);
            if page["has_more"] != json!(true) || after.is_none() {
                break;
            }
        }
        Ok(None)
    }

    async fn status(&self, id: &str) -> Result<Value> {
        self.json(
            self.request(reqwest::Method::GET, &format!("batches/{id}")),
            "polling",
        )
        .await
    }

    async fn content(&self, file_id: &str) -> Result<ResultLines> {
        let response = self
            .request(reqwest::Method::GET, &format!("files/{file_id}/content"))
            .send()
            .await
            .with_context(|| format!("Batch API, downloading {file_id}"))?;
        if !response.status().is_success() {
            return Err(Error::Execution(format!(
                "Batch API, downloading {file_id}: HTTP {}",
                response.status()
            )));
        }
        Ok(result_lines(response.bytes_stream()))
    }
}

fn id_of(v: &Value, what: &str) -> Result<String> {
    v["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Execution(format!("Batch API, {what}: the reply has no id")))
}

/// Splits request lines into files within the API's limits.
pub fn split_files(lines: &[Value]) -> Vec<Vec<u8>> {
    let mut files = Vec::new();
    let mut current = Vec::new();
    let mut count = 0;
    for line in lines {
        let encoded = line.to_string();
        if count == MAX_LINES || (count > 0 && current.len() + encoded.len() + 1 > MAX_BYTES) {
            files.push(std::mem::take(&mut current));
            count = 0;
        }
        current.extend(encoded.bytes());
        current.push(b'\n');
        count += 1;
    }
    if count > 0 {
        files.push(current);
    }
    files
}

/// Submits `stage`'s unanswered requests to the OpenAI Batch API at the endpoint of the model
/// role the stage calls, waits for the batches (polling every `poll`), records the results in
/// the journal, and resubmits what failed or expired, up to three rounds. Batches recorded by
/// an earlier, interrupted command are polled first.
pub async fn submit(job: &Job, stage: &str, poll: Duration) -> Result<SubmitSummary> {
    let root = Location::parse(&job.output)?;
    let stage = job.canonical_stage_name(stage).to_string();
    let api = api_for(job, &stage)?;
    let state_path = root.child("_batches").path(&format!("{stage}.json"));
    let mut records: Vec<BatchRecord> = match root.store.get(&state_path).await {
        Ok(got) => serde_json::from_slice(&got.bytes().await?)
            .with_context(|| format!("{}", root.display(&state_path)))?,
        Err(object_store::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut summary = SubmitSummary::default();
    for round in 0..=MAX_ROUNDS {
        summary.recorded += wait(job, &api, &root, &state_path, &mut records, poll).await?;
        let lines = capture_stage_requests(job, &stage).await?;
        summary.unanswered = lines.len();
        if lines.is_empty() || round == MAX_ROUNDS {
            break;
        }
        for file in split_files(&lines) {
            let requests = file.iter().filter(|b| **b == b'\n').count();
            let endpoint = lines[0]["url"]
                .as_str()
                .unwrap_or("/v1/chat/completions")
                .to_string();
            let digest = {
                use sha2::{Digest, Sha256};
                hex::encode(&Sha256::digest(&file)[..16])
            };
            // Created by a command that died before it could record the batch: adopted.
            let (id, file_id) = match api.find(&digest, &records).await? {
                Some(found) => {
                    tracing::warn!(batch = %found.0, "Found a batch of these requests that no record names; polling it instead of creating another.");
                    found
                }
                None => {
                    let file_id = api.upload(file).await?;
                    let id = api.create(&file_id, &endpoint, &digest).await?;
                    summary.batches_created += 1;
                    (id, file_id)
                }
            };
            records.push(BatchRecord {
                id,
                input_file_id: file_id,
                requests,
                state: "submitted".into(),
                digest,
            });
            save(&root, &state_path, &records).await?;
        }
    }
    Ok(summary)
}

/// Polls every submitted batch until it ends; records its output (complete, or partial for an
/// expired batch) in the journal. Returns the responses recorded.
async fn wait(
    job: &Job,
    api: &Api,
    root: &Location,
    state_path: &object_store::path::Path,
    records: &mut [BatchRecord],
    poll: Duration,
) -> Result<u64> {
    let mut recorded = 0;
    loop {
        let mut pending = 0;
        for i in 0..records.len() {
            if records[i].state != "submitted" {
                continue;
            }
            let record = &records[i];
            let status = api.status(&record.id).await?;
            let state = status["status"].as_str().unwrap_or("").to_string();
            match state.as_str() {
                "completed" | "expired" | "failed" | "cancelled" => {}
                "validating" | "in_progress" | "finalizing" | "cancelling" => {
                    pending += 1;
                    continue;
                }
                other => {
                    return execution_error!(
                        "Batch API, batch {}: unknown status '{}'; its id is kept in {}, so running `batch submit` again resumes polling",
                        record.id,
                        escape_control(other),
                        root.display(state_path)
                    );
                }
            }
            if let Some(output) = status["output_file_id"].as_str() {
                let lines = api.content(output).await?;
                let (ok, _failed) =
                    import_batch_results(job, &format!("batch {}", record.id), lines).await?;
                recorded += ok;
            }
            tracing::info!(batch = %record.id, status = %state, "Batch ended.");
            records[i].state = state;
            save(root, state_path, records).await?;
        }
        if pending == 0 {
            return Ok(recorded);
        }
        tokio::time::sleep(poll).await;
    }
}

async fn save(
    root: &Location,
    path: &object_store::path::Path,
    records: &[BatchRecord],
) -> Result<()> {
    let body = serde_json::to_vec_pretty(records).map_err(|e| Error::Internal(e.to_string()))?;
    root.store.put(path, PutPayload::from(body)).await?;
    Ok(())
}

/// The Batch API of the (single) model role `stage` calls.
fn api_for(job: &Job, stage: &str) -> Result<Api> {
    let spec = job
        .stages
        .iter()
        .find(|s| s.name == stage)
        .ok_or_else(|| Error::Job(format!("no stage named '{stage}'")))?;
    let roles: Vec<&str> = job
        .functions
        .iter()
        .filter(|f| spec.sql.contains(&format!("{}(", f.name)))
        .map(|f| f.role.as_str())
        .collect();
    let Some(role) = roles.first() else {
        return Err(Error::Job(format!("stage '{stage}' calls no LLM")));
    };
    let model = &job.models[*role];
    let base = model
        .endpoints
        .first()
        .filter(|e| e.starts_with("http"))
        .ok_or_else(|| {
            Error::Job(format!(
                "model role '{role}' has no HTTP endpoint for the Batch API"
            ))
        })?;
    Ok(Api {
        // Uploads and downloads of batch files are large, but no request may hang forever.
        http: reqwest::Client::builder()
            .redirect(crate::llm::endpoint::same_origin_redirects())
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(1800))
            .build()
            .map_err(|e| Error::Internal(format!("an HTTP client: {e}")))?,
        base: base.clone(),
        key: std::env::var(&model.api_key_env)
            .ok()
            .filter(|k| !k.is_empty() && model.sends_key_to(base)),
    })
}
