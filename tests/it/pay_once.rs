//! Pay once, whatever changes between runs: a response is found by what was asked, wherever
//! its row sits now (a reshard, a rule that drops rows, an added input), a refusal is an
//! answer, and a journal that cannot be written stops the spending until it can.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use crate::support::fake_server::{FakeServer, FakeState, Fault};
use crate::support::util::{backforth, marker};

/// `n` documents in `dir/name`, numbered from `first`: every third has two sentences more
/// (so a `min_words` rule drops the others), each text unique.
fn write_docs(dir: &Path, name: &str, first: usize, n: usize) {
    let docs: String = (first..first + n)
        .map(|i| {
            let mut text = format!(
                "Document {i} describes how the village of Elm{i} keeps its {} well tended through the seasons.",
                ["canals", "orchards", "bridges", "markets"][i % 4]
            );
            if i % 3 == 0 {
                text += " Its people meet every spring to agree who mends what, and they write it down.";
            }
            serde_json::json!({ "id": format!("doc-{i:04}"), "text": text }).to_string() + "\n"
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), docs).unwrap();
}

/// A job over `docs/` with the paper's stages, `shard_rows` rows per shard and `extra`
/// appended (rules, ...).
fn write_job(dir: &Path, shard_rows: usize, extra: &str) -> String {
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs\"]\n[curate]\nthreshold = 4\n\
             [execution]\nshard_rows = {shard_rows}\n{extra}\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n\
             [[stages]]\nname = \"scored\"\n[[stages]]\nname = \"curated\"\n\
             [[stages]]\nname = \"rewritten\"\n[[stages]]\nname = \"distilled\"\n"
        ),
    )
    .unwrap();
    job.to_str().unwrap().to_string()
}

/// The arguments running `job` into `root` against `server`, 8 calls at a time.
fn run_args(job: &str, root: &Path, server: &FakeServer) -> Vec<String> {
    let root = root.to_str().unwrap();
    let url = server.url();
    [
        "run",
        job,
        "--output",
        root,
        "--endpoint",
        &url,
        "--model",
        "m",
    ]
    .into_iter()
    .chain(["--concurrency", "8"])
    .map(String::from)
    .collect()
}

fn run(job: &str, root: &Path, server: &FakeServer, more: &[&str]) -> std::process::Output {
    let mut args = run_args(job, root, server);
    args.extend(more.iter().map(|a| a.to_string()));
    backforth(&args)
}

fn run_ok(job: &str, root: &Path, server: &FakeServer, more: &[&str]) {
    let out = run(job, root, server, more);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs again into `root` with the job rewritten for `shard_rows` and `extra`, allowing the
/// changes.
fn rerun_changed(dir: &Path, shard_rows: usize, extra: &str, root: &Path, server: &FakeServer) {
    run_ok(
        &write_job(dir, shard_rows, extra),
        root,
        server,
        &["--allow-changes"],
    );
}

/// Rows kept by every stage of a finished root, as a comparable list.
fn rows_out(root: &Path) -> Vec<u64> {
    [
        "candidates",
        "backtranslated",
        "scored",
        "curated",
        "rewritten",
    ]
    .iter()
    .map(|stage| marker(root, stage)["rows_out"].as_u64().unwrap())
    .collect()
}

/// `docs` documents run through every stage in shards of `shard_rows`: the folder, the
/// server that answered them and the output root.
fn answered(docs: usize, shard_rows: usize) -> (tempfile::TempDir, FakeServer, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_docs(&dir.path().join("docs"), "a.jsonl", 0, docs);
    let server = FakeServer::start(Duration::from_millis(1));
    let root = dir.path().join("out");
    run_ok(&write_job(dir.path(), shard_rows, ""), &root, &server, &[]);
    (dir, server, root)
}

/// A new shard size moves nearly every row to another shard: nothing is asked again, and
/// the output is a fresh run's.
#[test]
fn a_reshard_sends_no_request_again() {
    let (dir, server, root) = answered(120, 20);
    let paid = server.requests();
    let before = rows_out(&root);

    rerun_changed(dir.path(), 30, "", &root, &server);
    assert_eq!(server.requests(), paid);
    assert_eq!(rows_out(&root), before);
    let shards = marker(&root, "backtranslated")["shards"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(shards, 4, "120 rows in shards of 30");

    // And back: the rows find their answers in the first layout's journals or the second's.
    rerun_changed(dir.path(), 20, "", &root, &server);
    assert_eq!(server.requests(), paid);
}

/// A rule that drops documents before the LLM stages shifts every later row to another
/// part: the rows left are all answered already.
#[test]
fn a_rule_that_drops_rows_sends_no_request_again() {
    let (dir, server, root) = answered(120, 20);
    let paid = server.requests();
    let before = marker(&root, "backtranslated")["rows_out"]
        .as_u64()
        .unwrap();

    rerun_changed(
        dir.path(),
        20,
        "[prepare.quality]\nmin_words = 20\n",
        &root,
        &server,
    );
    assert_eq!(server.requests(), paid);
    let after = marker(&root, "backtranslated")["rows_out"]
        .as_u64()
        .unwrap();
    assert_eq!(
        (before, after),
        (120, 40),
        "every third document is long enough"
    );
}

/// A second input adds its own documents; the first input's files keep their journals, so
/// only the new documents' requests are sent: as many as a run over them alone sends.
#[test]
fn a_new_input_sends_only_its_own_requests() {
    let dir = tempfile::tempdir().unwrap();
    write_docs(&dir.path().join("docs"), "a.jsonl", 0, 120);
    write_docs(&dir.path().join("more"), "a.jsonl", 500, 12);
    let job = write_job(dir.path(), 20, "");
    let alone = FakeServer::start(Duration::from_millis(1));
    let more = dir.path().join("more");
    run_ok(
        &job,
        &dir.path().join("alone"),
        &alone,
        &["--input", more.to_str().unwrap()],
    );
    assert!(alone.requests() > 12);

    let server = FakeServer::start(Duration::from_millis(1));
    let root = dir.path().join("out");
    let docs = dir.path().join("docs");
    run_ok(&job, &root, &server, &["--input", docs.to_str().unwrap()]);
    let paid = server.requests();
    run_ok(
        &job,
        &root,
        &server,
        &[
            "--input",
            docs.to_str().unwrap(),
            "--input",
            more.to_str().unwrap(),
            "--allow-changes",
        ],
    );
    assert_eq!(server.requests() - paid, alone.requests());
    assert_eq!(server.repeated_prompts(), 0);
}

/// A refused reply (`content: null` with the model's words in `refusal`, or a provider's
/// `content_filter`) is paid for once, journaled, and drops its row as `refused`; a rerun
/// sends nothing for it.
#[test]
fn refusals_are_answers_paid_once_and_dropped_as_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_docs(&dir.path().join("docs"), "a.jsonl", 0, 30);
    let refused = [3usize, 8, 14, 17, 22, 29];
    let faults = refused
        .iter()
        .enumerate()
        .map(|(k, i)| {
            let fault = if k % 2 == 0 {
                Fault::Refused(Some("I can't help with that.".into()))
            } else {
                Fault::Refused(None)
            };
            (format!("village of Elm{i} "), VecDeque::from([fault]))
        })
        .collect();
    let server = FakeServer::start_with(FakeState {
        latency: Duration::from_millis(1),
        faults: std::sync::Mutex::new(faults),
        ..FakeState::default()
    });
    let root = dir.path().join("out");
    let job = write_job(dir.path(), 10, "");
    run_ok(&job, &root, &server, &[]);
    let stage = marker(&root, "backtranslated");
    assert_eq!(stage["dropped"]["refused"], 6, "{stage}");
    assert!(stage["dropped"].get("llm_error").is_none(), "{stage}");
    for i in refused {
        let asked = server
            .state
            .per_prompt
            .lock()
            .unwrap()
            .iter()
            .filter(|(prompt, _)| prompt.contains(&format!("village of Elm{i} ")))
            .map(|(_, n)| *n)
            .sum::<u64>();
        assert_eq!(asked, 1, "document {i} was asked {asked} times");
    }
    let paid = server.requests();
    run_ok(&job, &root, &server, &["--allow-changes"]);
    std::fs::remove_dir_all(root.join("backtranslated")).unwrap();
    run_ok(&job, &root, &server, &[]);
    assert_eq!(server.requests(), paid);
    assert_eq!(marker(&root, "backtranslated")["dropped"]["refused"], 6);
}

/// A tmpfs mounted for a test (which runs as root, as `.ci/run` does), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs at {at:?} needs root");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A child process killed when dropped, so a failed assertion leaves no run behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fills the file system holding `dir` with one file; its path.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
    path
}

/// The output disk fills while calls are in flight: once a journal write fails no request is
/// sent, the calls in flight hold their answers until room is made, and the run ends (after
/// a rerun if a part could not be written meanwhile) with no prompt asked twice.
#[test]
fn a_full_disk_stops_spending_until_room_is_made() {
    let dir = tempfile::tempdir().unwrap();
    write_docs(&dir.path().join("docs"), "a.jsonl", 0, 200);
    let root = dir.path().join("out");
    let _disk = Tmpfs::mount(&root, "8m");
    let server = FakeServer::start(Duration::from_millis(20));
    let job = write_job(dir.path(), 50, "");
    let mut child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
            .args(run_args(&job, &root, &server))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Requests the server had seen when the first journal write failed, read as it is logged.
    let stderr = child.0.stderr.take().unwrap();
    let state = std::sync::Arc::clone(&server.state);
    let log = std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut at_failure = None;
        let mut text = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if at_failure.is_none() && line.contains("Journal write failed") {
                at_failure = Some(state.requests.load(std::sync::atomic::Ordering::SeqCst));
            }
            text += &line;
            text.push('\n');
        }
        (at_failure, text)
    });
    while server.requests() < 40 {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The journal's files still have room in their last pages: a few more writes fit.
    let filler = fill(&root);
    std::thread::sleep(Duration::from_secs(1));
    let stalled = server.requests();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        server.requests(),
        stalled,
        "requests were sent while journal writes failed"
    );

    std::fs::remove_file(filler).unwrap();
    let status = child.0.wait().unwrap();
    let (at_failure, stderr) = log.join().unwrap();
    let at_failure = at_failure.unwrap_or_else(|| panic!("no journal write failed:\n{stderr}"));
    // After the first failure only the calls already on the wire (8 slots) were answered.
    assert!(stalled - at_failure <= 8, "{at_failure} -> {stalled}");
    if !status.success() {
        // A part or marker due while the disk was full: the rerun finishes from the journal.
        run_ok(&job, &root, &server, &[]);
    }
    assert_eq!(server.repeated_prompts(), 0);
    assert_eq!(rows_out(&root)[1], 200);
}

/// An identical prompt in a later shard of the same run is answered by the shard that paid
/// for it, not sent again: here every document opens with the same five words, so the fake's
/// backward model gives every row the same instruction, and `distilled` asks it once,
/// although the shards run one after another.
#[test]
fn an_identical_prompt_in_a_later_shard_is_not_paid_again() {
    let dir = tempfile::tempdir().unwrap();
    let docs: String = (0..20)
        .map(|i| {
            let text = format!(
                "Notes on the river Elm, part {i}: how the banks at mile {} were kept in {}.",
                i * 3 + 1,
                1900 + i
            );
            serde_json::json!({ "id": format!("d{i}"), "text": text }).to_string() + "\n"
        })
        .collect();
    std::fs::create_dir_all(dir.path().join("docs")).unwrap();
    std::fs::write(dir.path().join("docs/a.jsonl"), docs).unwrap();
    let job = write_job(dir.path(), 5, "concurrent_shards = 1");
    let server = FakeServer::start(Duration::from_millis(1));
    let root = dir.path().join("out");
    run_ok(&job, &root, &server, &[]);
    assert!(marker(&root, "distilled")["rows_out"].as_u64().unwrap() > 2);
    let asked = |needle: &str| {
        server
            .log()
            .iter()
            .filter(|e| e.prompt.contains(needle) && !e.prompt.contains("Score: N"))
            .filter(|e| !e.prompt.contains("[RES]"))
            .count()
    };
    assert_eq!(asked("Tell me about Notes on the river Elm,"), 1);
    assert_eq!(server.repeated_prompts(), 0);
}

/// `[execution] fsync = true` flushes every journal append and every part to the device
/// (counted with strace: at least one flush a response), gives the output a run without it
/// gives, and switching it off and on again needs no `--allow-changes`: it changes how, not
/// what, a run writes.
#[test]
fn fsync_flushes_each_response_and_changes_no_result() {
    let dir = tempfile::tempdir().unwrap();
    write_docs(&dir.path().join("docs"), "a.jsonl", 0, 30);
    let server = FakeServer::start(Duration::from_millis(1));
    let plain = dir.path().join("plain");
    run_ok(&write_job(dir.path(), 10, ""), &plain, &server, &[]);
    let requests = server.requests();

    let job = write_job(dir.path(), 10, "fsync = true");
    let root = dir.path().join("out");
    let trace = dir.path().join("trace");
    let strace = std::env::var("BACKFORTH_STRACE").unwrap_or_else(|_| "strace".into());
    let out = std::process::Command::new(&strace)
        .args(["-f", "-qq", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_backforth"))
        .args(run_args(&job, &root, &server))
        .output()
        .unwrap_or_else(|e| panic!("{strace} does not run ({e}); apt-get install strace"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flushes = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
        .count() as u64;
    assert!(
        flushes > requests,
        "{flushes} flushes for {requests} responses"
    );
    assert_eq!(rows_out(&root), rows_out(&plain));

    run_ok(&write_job(dir.path(), 10, ""), &root, &server, &[]);
    assert_eq!(server.requests(), 2 * requests);
}

/// A key file describes the compacted object it was written with: one whose object was
/// written again since (by a version that writes no key file) is not trusted, and the
/// object itself is read. Here every key file is made stale (an empty list, for an object
/// one byte longer): a reshard still finds every answer.
#[test]
fn a_stale_key_file_is_not_trusted() {
    let (dir, server, root) = answered(60, 20);
    let paid = server.requests();
    let mut stale = 0;
    for stage in std::fs::read_dir(root.join("_journal")).unwrap() {
        let stage = stage.unwrap().path();
        for file in std::fs::read_dir(&stage).into_iter().flatten() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|e| e == "keys") {
                let size = std::fs::metadata(path.with_extension("jsonl"))
                    .unwrap()
                    .len();
                let mut body = b"bfkeys3\n".to_vec();
                body.extend_from_slice(&(size + 1).to_le_bytes());
                std::fs::write(&path, body).unwrap();
                stale += 1;
            }
        }
    }
    assert!(stale >= 6, "{stale} key files");
    rerun_changed(dir.path(), 30, "", &root, &server);
    assert_eq!(server.requests(), paid);
}

/// Two processes writing one shard's journal (a claim taken over from a process thought
/// gone) and compacting it in turn: each merges what the other compacted, and deletes only
/// the segments it read, so no answer is lost.
#[tokio::test]
async fn two_writers_compacting_one_shard_lose_no_answer() {
    use backforth::llm::journal::Journal;
    use backforth::llm::reply::Reply;
    use backforth::storage::Location;
    let dir = tempfile::tempdir().unwrap();
    let root = Location::parse(dir.path().to_str().unwrap()).unwrap();
    let reply = |text: &str| Reply {
        text: Some(text.to_string()),
        finish_reason: Some("stop".into()),
        ..Reply::default()
    };
    let first = Journal::open(&root).await.unwrap();
    let second = Journal::open(&root).await.unwrap();
    let a = first.scope("scored", "part-0").await.unwrap();
    let b = second.scope("scored", "part-0").await.unwrap();
    a.record("key-a", &reply("a")).await;
    b.record("key-b", &reply("b")).await;
    b.compact().await.unwrap();
    a.record("key-c", &reply("c")).await;
    a.compact().await.unwrap();
    b.record("key-d", &reply("d")).await;
    b.compact().await.unwrap();

    let reader = Journal::open(&root).await.unwrap();
    let scope = reader.scope("scored", "part-0").await.unwrap();
    for (key, text) in [
        ("key-a", "a"),
        ("key-b", "b"),
        ("key-c", "c"),
        ("key-d", "d"),
    ] {
        let got = scope.get(key).unwrap_or_else(|| panic!("{key} was lost"));
        assert_eq!(got.text.as_deref(), Some(text));
    }
    let segments = std::fs::read_dir(dir.path().join("_journal/scored/part-0"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(segments, 0, "every segment was folded in and deleted");
}
