//! Inputs as a set: a file removed, renamed, or edited in place keeping its size changes what
//! every stage holds exactly as a fresh run on the new files would, and the files whose shards
//! were only renumbered are not sent to the model again.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::support::fake_server::FakeServer;
use crate::support::util::{backforth_ok, marker, rows, session};

fn write_file(dir: &Path, name: &str, topic: &str) {
    let lines: String = (0..3)
        .map(|i| {
            serde_json::json!({"text": format!("The {topic} page number {i} tells its own story.")})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join(name), lines).unwrap();
}

fn job(dir: &Path) -> String {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        "output = \"out\"\n[input]\npaths = [\"docs\"]\n[execution]\nshard_rows = 2\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// Every (table, doc_id, text) of the stages under `root`, read as `sql` reads them: the
/// whole stage folder.
async fn contents(root: &Path) -> BTreeSet<(String, String, String)> {
    let ctx = session(root).await;
    let mut out = BTreeSet::new();
    for table in ["candidates", "backtranslated"] {
        let query = format!("SELECT doc_id, text FROM {table}");
        for row in rows(&ctx, &query).await {
            out.insert((table.to_string(), row[0].clone(), row[1].clone()));
        }
        let count = rows(&ctx, &format!("SELECT count(*) FROM {table}")).await[0][0].clone();
        assert_eq!(
            count,
            marker(root, table)["rows_out"].to_string(),
            "{table}"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_renamed_and_edited_inputs_leave_what_a_fresh_run_would() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for (name, topic) in [
        ("a.jsonl", "river"),
        ("b.jsonl", "bridge"),
        ("c.jsonl", "orchard"),
        ("d.jsonl", "lantern"),
    ] {
        write_file(&docs, name, topic);
    }
    let server = FakeServer::start(Duration::from_millis(1));
    let url = server.url();
    let job = job(dir.path());
    let run = |root: &Path| {
        backforth_ok(&[
            "run",
            &job,
            "--output",
            root.to_str().unwrap(),
            "--endpoint",
            &url,
            "--model",
            "m",
        ]);
    };
    let root = dir.path().join("out");
    run(&root);
    assert_eq!(marker(&root, "backtranslated")["rows_out"], 12);
    let sent = server.requests();

    std::fs::remove_file(docs.join("b.jsonl")).unwrap();
    std::fs::rename(docs.join("c.jsonl"), docs.join("e.jsonl")).unwrap();
    let edited = std::fs::read_to_string(docs.join("d.jsonl"))
        .unwrap()
        .replacen("number 1", "number 9", 1);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(docs.join("d.jsonl"), edited).unwrap();
    run(&root);
    // Responses are found by what was asked, not where: the removal renumbering shards and
    // the renamed file's three documents cost nothing; only the edited document is new.
    assert_eq!(server.requests(), sent + 1);

    let fresh = dir.path().join("fresh");
    run(&fresh);
    let now = contents(&root).await;
    assert_eq!(now, contents(&fresh).await);
    assert_eq!(now.len(), 18, "9 documents in two tables");
    assert!(
        now.iter()
            .all(|(_, id, _)| !id.starts_with("b.jsonl") && !id.starts_with("c.jsonl"))
    );
    assert!(
        now.iter()
            .any(|(_, _, text)| text.contains("lantern page number 9"))
    );
}

#[test]
fn object_store_urls_are_read_in_every_form_users_write() {
    use backforth::storage::{CloudUrl, Location};
    let parts = |url: &str| {
        let p = CloudUrl::parse(url).unwrap();
        (p.scheme, p.account, p.bucket, p.prefix)
    };
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        parts("s3://corpus/dolma/v1/"),
        ("s3", None, "corpus".into(), "dolma/v1".into())
    );
    assert_eq!(
        parts("gs://corpus/dolma"),
        ("gs", None, "corpus".into(), "dolma".into())
    );
    assert_eq!(
        parts("az://data/runs/a"),
        ("az", None, "data".into(), "runs/a".into())
    );
    // The container is the user part, not the host (which names the account).
    assert_eq!(
        parts("abfss://data@acct.dfs.core.windows.net/runs/a"),
        ("az", some("acct"), "data".into(), "runs/a".into())
    );
    assert_eq!(
        parts("abfs://data@acct.dfs.core.windows.net/"),
        ("az", some("acct"), "data".into(), String::new())
    );
    assert_eq!(
        parts("https://acct.blob.core.windows.net/data/runs/a"),
        ("az", some("acct"), "data".into(), "runs/a".into())
    );
    assert_eq!(
        parts("https://acct.dfs.core.windows.net/data"),
        ("az", some("acct"), "data".into(), String::new())
    );
    let error = CloudUrl::parse("https://example.org/data")
        .unwrap_err()
        .to_string();
    assert!(error.contains("scheme 'https' is not supported"), "{error}");
    assert!(CloudUrl::parse("s3:///path").is_err());
    // The Azure store is built for the URL's account and container.
    let location = Location::parse("abfss://data@acct.dfs.core.windows.net/runs/a").unwrap();
    assert_eq!(location.store_url.as_str(), "az://data");
    assert_eq!(location.prefix.as_ref(), "runs/a");
    assert_eq!(location.describe(), "az://data/runs/a");
}
