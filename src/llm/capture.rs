//! The backend of `batch export`: requests written down for an offline batch instead of sent.

use std::sync::Mutex;

use serde_json::{Value, json};

use crate::llm::client::{Backend, ModelClient};
use crate::llm::journal::JournalScope;
use crate::llm::reply::{Reply, Request};
use crate::llm::wire::{RequestBody, request_path};

/// Requests written down for an offline batch (`vllm run-batch`, the OpenAI Batch API), one
/// line each in the OpenAI batch format, keyed by the request key.
#[derive(Debug, Default)]
pub struct Capture {
    lines: Mutex<Vec<Value>>,
    seen: Mutex<std::collections::HashSet<String>>,
}

impl Capture {
    /// The lines captured so far, each request once.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().expect("lock poisoned").clone()
    }
}

#[async_trait::async_trait]
impl Backend for Capture {
    async fn send(
        &self,
        client: &ModelClient,
        req: &Request,
        key: &str,
        _journal: &JournalScope,
    ) -> Reply {
        if self
            .seen
            .lock()
            .expect("lock poisoned")
            .insert(key.to_string())
        {
            let body = RequestBody {
                spec: client.spec(),
                req,
            };
            let path = request_path(client.spec());
            self.lines.lock().expect("lock poisoned").push(json!({
                "custom_id": key, "method": "POST", "url": format!("/v1/{path}"), "body": body,
            }));
        }
        Reply {
            error: Some("written to an offline batch, not sent".to_string()),
            ..Reply::default()
        }
    }
}
