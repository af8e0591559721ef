//! The `mock` endpoint: an offline stand-in that answers deterministically from a hash of the
//! prompt, so the pipeline can be tried without a server.

use serde_json::json;
use sha2::{Digest, Sha256};

use std::sync::atomic::Ordering;

use crate::job::catalog::MockPrompt;
use crate::llm::client::{Backend, ModelClient};
use crate::llm::journal::JournalScope;
use crate::llm::reply::{Reply, Request};

/// The backend of `--endpoint mock`: every answer made by [`mock_reply`] and journaled like a
/// server's.
#[derive(Debug)]
pub struct Mock;

#[async_trait::async_trait]
impl Backend for Mock {
    async fn send(
        &self,
        client: &ModelClient,
        req: &Request,
        key: &str,
        journal: &JournalScope,
    ) -> Reply {
        client.home().stats.requests.fetch_add(1, Ordering::Relaxed);
        client.home().stats.returned.fetch_add(1, Ordering::Relaxed);
        let mut reply = mock_reply(req);
        reply.cost_usd = client
            .spec()
            .cost_usd(reply.prompt_tokens, None, reply.completion_tokens);
        client
            .spending
            .add(crate::llm::budget::micro(reply.cost_usd));
        journal.record(key, &reply).await;
        reply
    }
}

/// The offline stand-in for a server: deterministic answers made from a hash of the prompt,
/// shaped like what each task expects (the catalog's `mock`). It is for trying the pipeline,
/// not for real data.
pub fn mock_reply(req: &Request) -> Reply {
    let mut hasher = Sha256::new();
    hasher.update(req.prompt.as_bytes());
    // Samples of one prompt differ, as a server's do under their seeds.
    if let Some(sample) = req.sample {
        hasher.update(sample.to_le_bytes());
    }
    let digest = hasher.finalize();
    let h = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    let tail = prompt_tail(&req.prompt);
    let prompt = MockPrompt {
        prompt: &req.prompt,
        tail,
        hash: h,
        sample: req.sample.unwrap_or(0),
    };
    let text = match &req.schema {
        Some(schema) => schema.example(h).to_string(),
        None => (req.mock.0)(prompt),
    };
    // Usage as a cl100k tokenizer counts it, so the mock's token figures read like a server's.
    let tokens = |s: &str| bpe_openai::cl100k_base().count(s) as i64;
    if req.top_logprobs.is_some() {
        // A judge sure of one digit, with a little mass on its neighbours.
        let best = 1 + (h % 5) as i64;
        let top: Vec<(String, f64)> = (1..=5)
            .map(|d: i64| {
                let p: f64 = if d == best {
                    0.7
                } else if (d - best).abs() == 1 {
                    0.1
                } else {
                    0.02
                };
                (d.to_string(), p.ln())
            })
            .collect();
        return Reply {
            prompt_tokens: Some(tokens(&req.prompt)),
            completion_tokens: Some(1),
            text: Some(best.to_string()),
            finish_reason: Some("length".to_string()),
            attempts: 1,
            top_logprobs: Some(json!(top).to_string()),
            ..Reply::default()
        };
    }
    Reply {
        prompt_tokens: Some(tokens(&req.prompt)),
        completion_tokens: Some(tokens(&text)),
        text: Some(text),
        finish_reason: Some("stop".to_string()),
        attempts: 1,
        ..Reply::default()
    }
}

/// The last labelled block of a built-in prompt (the document or draft), or the whole prompt.
fn prompt_tail(prompt: &str) -> &str {
    ["Draft response:\n", "Answer:\n", "Text:\n"]
        .iter()
        .find_map(|label| prompt.rfind(label).map(|i| &prompt[i + label.len()..]))
        .unwrap_or(prompt)
}
