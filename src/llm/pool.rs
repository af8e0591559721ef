//! Every endpoint of a run, one per base URL, and the model roles bound to them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::job::ModelSpec;
use crate::llm::budget::{Budget, Spending};
use crate::llm::capture::Capture;
use crate::llm::client::{ApiKey, Backend, Http, ModelClient};
use crate::llm::endpoint::Endpoint;
use crate::llm::limits::Limits;
use crate::llm::mock::Mock;
use crate::llm::reply::Usage;

/// All endpoints of a run, one per base URL, and the model roles bound to them.
#[derive(Debug, Default)]
pub struct LlmPool {
    endpoints: HashMap<String, Arc<Endpoint>>,
    models: HashMap<String, ModelClient>,
    spending: Arc<Spending>,
    outstanding: Arc<AtomicUsize>,
    budget: Option<Budget>,
}

impl LlmPool {
    /// Builds one endpoint per distinct base URL. Roles sharing a server share its cap, which
    /// is the largest cap any of them asks for.
    pub fn new<'a>(
        models: impl IntoIterator<Item = &'a ModelSpec>,
        budget: Option<Budget>,
    ) -> Self {
        Self::build(models, budget, None)
    }

    /// A pool whose calls are written to `capture` instead of being sent (answers already in
    /// the journal are still used).
    pub fn capturing<'a>(
        models: impl IntoIterator<Item = &'a ModelSpec>,
        capture: Arc<Capture>,
    ) -> Self {
        Self::build(models, None, Some(capture))
    }

    fn build<'a>(
        models: impl IntoIterator<Item = &'a ModelSpec>,
        budget: Option<Budget>,
        capture: Option<Arc<Capture>>,
    ) -> Self {
        let models: Vec<&ModelSpec> = models.into_iter().collect();
        let mut pool = LlmPool {
            budget,
            ..LlmPool::default()
        };
        for spec in &models {
            let mut endpoints = Vec::new();
            for url in &spec.endpoints {
                let sharing = || models.iter().filter(|m| m.endpoints.contains(url));
                let endpoint = pool
                    .endpoints
                    .entry(url.clone())
                    .or_insert_with(|| {
                        // Roles sharing a server share its cap (the largest any asks for) and
                        // its limits (the strictest any sets).
                        let cap = sharing().map(|m| m.concurrency).max().unwrap_or(1);
                        let strictest = |f: fn(&ModelSpec) -> Option<f64>| {
                            sharing().filter_map(|m| f(m)).reduce(f64::min)
                        };
                        let limits = Limits::new(
                            strictest(|m| m.requests_per_minute),
                            strictest(|m| m.input_tokens_per_minute),
                            strictest(|m| m.output_tokens_per_minute),
                        );
                        let timeout = Duration::from_secs(spec.timeout_secs.max(1));
                        Arc::new(Endpoint::new(url, cap, timeout, limits))
                    })
                    .clone();
                endpoints.push(endpoint);
            }
            let key = std::env::var(&spec.api_key_env)
                .ok()
                .filter(|k| !k.is_empty())
                .map(ApiKey);
            // Decided once per endpoint, not per request.
            let key_to = endpoints
                .iter()
                .map(|e| spec.sends_key_to(&e.base_url))
                .collect();
            pool.models.insert(
                spec.role.clone(),
                ModelClient {
                    spec: (*spec).clone(),
                    endpoints,
                    key,
                    key_to,
                    in_flight: Arc::default(),
                    spending: Arc::clone(&pool.spending),
                    outstanding: Arc::clone(&pool.outstanding),
                    rows: Arc::new(tokio::sync::Semaphore::new(ModelClient::rows_at_once(spec))),
                    budget: pool.budget,
                    backend: backend_of(spec, capture.as_ref()),
                    ignores_n: Arc::default(),
                },
            );
        }
        pool
    }

    /// The client for a model role.
    pub fn model(&self, role: &str) -> Option<&ModelClient> {
        self.models.get(role)
    }

    /// Counters summed over every endpoint.
    pub fn usage(&self) -> Usage {
        self.endpoints
            .values()
            .fold(Usage::default(), |acc, e| acc.plus(&e.usage()))
    }

    /// The budget's message once the run has spent it.
    pub fn budget_spent(&self) -> Option<String> {
        let budget = self.budget?;
        budget.spent(&self.spending).then(|| budget.message())
    }

    /// Why a role can send no more requests (the quota of all its endpoints is exhausted).
    pub fn quota_exhausted(&self) -> Option<String> {
        // A role stops when every one of its endpoints is out of quota.
        self.models.values().find_map(|m| {
            let quotas: Option<Vec<String>> = m.endpoints.iter().map(|e| e.quota()).collect();
            quotas.map(|q| q.join("; "))
        })
    }

    /// Calls of every role waiting for a slot or on the wire: what the server has to do next.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// The most requests one role may have in flight now (this process's share of its
    /// endpoints' caps, summed over its replicas).
    pub fn max_concurrency(&self) -> usize {
        self.models
            .values()
            .map(|m| m.endpoints.iter().map(|e| e.slots.cap()).sum::<usize>())
            .max()
            .unwrap_or(1)
    }

    /// [`LlmPool::max_concurrency`] before the caps are shared between processes.
    pub fn configured_concurrency(&self) -> usize {
        self.models
            .values()
            .map(|m| {
                m.endpoints
                    .iter()
                    .map(|e| e.configured_cap())
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(1)
    }

    /// HTTP requests that came back, answered or not, over every endpoint.
    pub fn returned(&self) -> u64 {
        self.endpoints
            .values()
            .map(|e| e.stats.returned.load(Ordering::Relaxed))
            .sum()
    }

    /// The longest time a role the job declares waits for a reply (`timeout_secs`).
    pub fn longest_timeout(&self) -> Duration {
        let declared = self.models.values().filter(|m| m.spec.declared);
        let secs = declared.map(|m| m.spec.timeout_secs).max();
        let secs = secs.or_else(|| self.models.values().map(|m| m.spec.timeout_secs).max());
        Duration::from_secs(secs.unwrap_or(0))
    }

    /// Takes this process's share of every endpoint's cap and rates, when `processes` run on
    /// the job and this one is `rank` among them.
    pub fn share(&self, processes: usize, rank: usize) {
        for endpoint in self.endpoints.values() {
            endpoint.share(processes, rank);
        }
    }
}

/// Where a role's requests go: written down when capturing, else the mock or HTTP by the
/// role's first endpoint.
fn backend_of(spec: &ModelSpec, capture: Option<&Arc<Capture>>) -> Arc<dyn Backend> {
    match capture {
        Some(capture) => Arc::clone(capture) as Arc<dyn Backend>,
        None if spec.endpoints.first().is_some_and(|e| e == "mock") => Arc::new(Mock),
        None => Arc::new(Http),
    }
}
