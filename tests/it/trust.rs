//! What a shared job file cannot make the tool do: send a key anywhere but where it belongs,
//! name another secret as its key, read files outside its folder, or take the root's own
//! names; and what a URL's credentials look like in what is printed.

use std::time::Duration;

use crate::hostile::backtranslation_job;
use crate::support::fake_server::{FakeServer, Fault};
use crate::support::util::{backforth, backforth_with, ok, repo};

/// Where the API key goes: the default variable only to OpenAI; a variable the job names to
/// that role's endpoints; never over plain HTTP except to this machine, unless the job says.
#[test]
fn the_api_key_goes_only_where_it_belongs() {
    use backforth::job::file::JobFile;
    use backforth::job::{Job, Overrides};
    let spec = |models: &str| {
        let file: JobFile = toml::from_str(&format!(
            "output = \"out\"\n[input]\npaths = [\"x.jsonl\"]\n{models}\n[[stages]]\nname = \"candidates\"\n"
        ))
        .unwrap();
        let job = Job::resolve(file, repo(), "keys".into(), &Overrides::default()).unwrap();
        job.models["backward"].clone()
    };
    let default =
        spec("[models.backward]\nendpoint = \"https://api.openai.com/v1\"\nmodel = \"m\"");
    assert!(default.sends_key_to("https://api.openai.com/v1"));
    assert!(!default.sends_key_to("https://vllm.internal/v1"));
    assert!(!default.sends_key_to("http://127.0.0.1:8000/v1"));
    let named = spec(
        "[models.backward]\nendpoint = \"https://vllm.internal/v1\"\nmodel = \"m\"\napi_key_env = \"VLLM_API_KEY\"",
    );
    assert!(named.sends_key_to("https://vllm.internal/v1"));
    assert!(!named.sends_key_to("http://vllm.internal:8000/v1"));
    assert!(named.sends_key_to("http://127.0.0.1:8000/v1"));
    assert!(named.sends_key_to("http://localhost:8000/v1"));
    assert!(named.sends_key_to("http://[::1]:8000/v1"));
    let clear = spec(
        "[models.backward]\nendpoint = \"http://vllm.internal/v1\"\nmodel = \"m\"\napi_key_env = \"VLLM_API_KEY\"\nkey_over_http = true",
    );
    assert!(clear.sends_key_to("http://vllm.internal:8000/v1"));

    // End to end: OPENAI_API_KEY set, a local server: no key is sent to it.
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"text\": \"A document about keys.\"}\n",
    )
    .unwrap();
    let job = backtranslation_job(dir.path(), &server);
    ok(backforth_with(
        &["run", &job],
        &[("OPENAI_API_KEY", "sk-openai-NeverSentHere")],
    ));
    let headers = server.state.headers.lock().unwrap().clone();
    assert!(!headers.is_empty());
    assert!(
        headers.iter().all(|(_, auth)| auth.is_none()),
        "{headers:?}"
    );
}

/// Credentials written into an endpoint URL never reach the log, an error or a stored row.
#[test]
fn credentials_in_an_endpoint_url_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    server
        .state
        .faults
        .lock()
        .unwrap()
        .push(("Quota case".to_string(), [Fault::Quota].into()));
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"id\": \"q\", \"text\": \"Quota case document.\"}\n",
    )
    .unwrap();
    let url = server.url().replace("http://", "http://alice:HuntEr2PW@");
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[models.backward]\nendpoint = \"{url}\"\nmodel = \"m\"\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n"
        ),
    )
    .unwrap();
    let out = backforth_with(
        &["run", job.to_str().unwrap()],
        &[("BACKFORTH_LOG", "debug")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("quota is exhausted") && stderr.contains("***@127.0.0.1"),
        "{stderr}"
    );
    assert!(!stderr.contains("HuntEr2PW"), "{stderr}");
    let mut files = vec![dir.path().join("out")];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(9).any(|w| w == b"HuntEr2PW"),
                "{}",
                path.display()
            );
        }
    }
}

/// A backtranslation job against a fresh fake server whose role reads its key from `var`:
/// the job's folder (kept alive by the caller), the server and the job's path.
fn job_naming_key(var: &str) -> (tempfile::TempDir, FakeServer, String) {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"text\": \"A document.\"}\n",
    )
    .unwrap();
    let job = backtranslation_job(dir.path(), &server);
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "model = \"m\"\n",
        &format!("model = \"m\"\napi_key_env = \"{var}\"\n"),
    );
    std::fs::write(&job, text).unwrap();
    (dir, server, job)
}

/// A shared job naming another secret as its key (`AWS_SECRET_ACCESS_KEY`, which the S3 docs
/// tell users to export) is refused before anything is sent, with how to allow it; listed in
/// `BACKFORTH_KEY_VARS` outside the job file, it is the user's choice and is sent.
#[test]
fn a_job_naming_another_secret_as_its_key_is_refused() {
    let (_dir, server, job) = job_naming_key("AWS_SECRET_ACCESS_KEY");
    let run = |allow: &[(&str, &str)]| {
        let secret = [("AWS_SECRET_ACCESS_KEY", "aws-secret-NeverSent")];
        backforth_with(&["run", &job], &[&secret[..], allow].concat())
    };
    let refused = run(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("api_key_env = \"AWS_SECRET_ACCESS_KEY\"")
            && stderr.contains("BACKFORTH_KEY_VARS=AWS_SECRET_ACCESS_KEY"),
        "{stderr}"
    );
    assert!(!stderr.contains("aws-secret-NeverSent"));
    assert_eq!(server.requests(), 0);

    ok(run(&[(
        "BACKFORTH_KEY_VARS",
        "OTHER_VAR, AWS_SECRET_ACCESS_KEY",
    )]));
    let headers = server.state.headers.lock().unwrap();
    assert!(
        headers
            .iter()
            .any(|(_, auth)| auth.as_deref() == Some("Bearer aws-secret-NeverSent")),
        "the listed variable is the user's choice"
    );
}

/// A job that reads a file outside its folder (a template at an absolute path, or reached
/// with `..`) is refused before anything is sent, saying how to allow it; `--allow-path`
/// allows it.
#[test]
fn a_job_reading_outside_its_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(
        secrets.path().join("credentials"),
        "aws_secret = NeverInAPrompt {{ text }}",
    )
    .unwrap();
    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    std::fs::write(
        jobs.join("docs.jsonl"),
        "{\"text\": \"A document about keys.\"}\n",
    )
    .unwrap();
    let job = backtranslation_job(&jobs, &server);
    let outside = secrets.path().join("credentials");
    for template in [
        outside.to_str().unwrap().to_string(),
        format!(
            "{}{}",
            "../".repeat(jobs.components().count() - 1),
            outside.strip_prefix("/").unwrap().display()
        ),
    ] {
        let mut text = std::fs::read_to_string(&job).unwrap();
        text = text
            .split("[functions.backtranslate]")
            .next()
            .unwrap()
            .to_string();
        text.push_str(&format!(
            "[functions.backtranslate]\ntemplate = {template:?}\n"
        ));
        std::fs::write(&job, text).unwrap();
        let out = crate::support::util::backforth(&["run", &job]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("is outside the job's folder") && stderr.contains("--allow-path"),
            "{stderr}"
        );
        assert_eq!(server.requests(), 0);
    }
    // Named without a folder, from the job's own folder, as most runs are: the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(["run", "job.toml"])
        .current_dir(&jobs)
        .env("BACKFORTH_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is outside the job's folder"), "{stderr}");
    assert_eq!(server.requests(), 0);
    let allowed = secrets.path().to_str().unwrap();
    ok(backforth(&["run", &job, "--allow-path", allowed]));
    assert!(server.requests() > 0);
}

/// Names the output root's own folders use are refused as stage names, and a rate too low to
/// mean anything is refused instead of panicking.
#[test]
fn reserved_stage_names_and_near_zero_rates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"text\": \"A document.\"}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("spend.sql"), "SELECT * FROM candidates").unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"_spend\"\nsql = \"spend.sql\"\n",
    )
    .unwrap();
    let out = crate::support::util::backforth(&["run", job.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("stage name '_spend' begins with '_'"),
        "{stderr}"
    );
    assert!(!dir.path().join("out/_spend").exists());

    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
         [models.backward]\nendpoint = \"mock\"\nmodel = \"m\"\nrequests_per_minute = 1e-17\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
    )
    .unwrap();
    let out = crate::support::util::backforth(&["run", job.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("requests_per_minute = 0.00000000000000001")
            || stderr.contains("requests_per_minute = 1e-17"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A job naming `OPENAI_API_KEY` itself does not thereby send it to its own endpoint: the
/// OpenAI key goes to OpenAI only, unless the user lists it in `BACKFORTH_KEY_VARS`.
#[test]
fn naming_the_openai_key_does_not_send_it_elsewhere() {
    let (_dir, server, job) = job_naming_key("OPENAI_API_KEY");
    ok(backforth_with(
        &["run", &job],
        &[("OPENAI_API_KEY", "sk-openai-NeverSentHere")],
    ));
    assert!(server.requests() > 0);
    let headers = server.state.headers.lock().unwrap();
    assert!(
        headers.iter().all(|(_, auth)| auth.is_none()),
        "{headers:?}"
    );
}

/// A stage's SQL is a query: `COPY ... TO` from a shared job's SQL writes no file.
#[test]
fn stage_sql_cannot_write_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"text\": \"A document.\"}\n",
    )
    .unwrap();
    let target = dir.path().join("pwned.csv");
    std::fs::write(
        dir.path().join("copy.sql"),
        format!(
            "COPY (SELECT 1 AS x) TO '{}' STORED AS CSV",
            target.display()
        ),
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"copied\"\nsql = \"copy.sql\"\nfrom = \"candidates\"\n",
    )
    .unwrap();
    let out = backforth(&["run", job.to_str().unwrap()]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!target.exists(), "the stage's SQL wrote a file");
}

/// `--allow-path s3://corpus` allows what is in that bucket, not a bucket whose name merely
/// begins the same (`s3://corpus-private`).
#[test]
fn an_allowed_bucket_does_not_allow_its_namesakes() {
    use backforth::job::file::JobFile;
    use backforth::job::{Job, Overrides};
    let resolve = |benchmark: &str| {
        let file: JobFile = toml::from_str(&format!(
            "output = \"out\"\n[input]\npaths = [\"x.jsonl\"]\n\
             [[decontaminate.benchmarks]]\nname = \"quiz\"\npaths = [\"{benchmark}\"]\nfields = [\"q\"]\n\
             [[stages]]\nname = \"candidates\"\n"
        ))
        .unwrap();
        let overrides = Overrides {
            allow_paths: vec!["s3://corpus".into()],
            ..Overrides::default()
        };
        Job::resolve(file, repo(), "buckets".into(), &overrides).map(|_| ())
    };
    resolve("s3://corpus/quiz.jsonl").unwrap();
    resolve("s3://corpus").unwrap();
    let refused = resolve("s3://corpus-private/quiz.jsonl")
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("is in an object store") && refused.contains("--allow-path"),
        "{refused}"
    );
}
