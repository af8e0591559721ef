//! The HTML report in headless Chromium: every plot rendered with its bars, and a document's
//! `<script>` shown as text, never run.

use std::path::PathBuf;
use std::process::Command;

use crate::stats::hand_made_root;
use crate::util::backforth_ok;

fn chromium() -> PathBuf {
    std::env::var_os("BACKFORTH_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

fn headless(profile: &std::path::Path) -> Command {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

#[test]
fn report_renders_in_chromium_and_runs_no_script_from_the_data() {
    assert!(
        chromium().exists(),
        "{} not found: install Debian's chromium (`apt-get install chromium`, as .ci/run does) or set BACKFORTH_CHROMIUM",
        chromium().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    hand_made_root(&root);
    let html = dir.path().join("report.html");
    backforth_ok(&[
        "report",
        root.to_str().unwrap(),
        "--out",
        html.to_str().unwrap(),
    ]);
    let source = std::fs::read_to_string(&html).unwrap();
    assert!(source.contains("what happened &lt;script&gt;alert(1)&lt;/script&gt;"));

    let url = format!("file://{}", html.display());
    let dom = headless(&dir.path().join("profile-dom"))
        .args(["--dump-dom", &url])
        .output()
        .unwrap();
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    // Score histogram 3 bars, yield 3, lengths 4, diversity 4.
    assert_eq!(dom.matches("<svg").count(), 4, "{dom}");
    assert_eq!(dom.matches("<rect class=\"bar\"").count(), 14);
    // The document's script is text in the page, and no script element exists.
    assert!(dom.contains("what happened &lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        !dom.contains("<script"),
        "a script element made it into the page"
    );

    let shot = dir.path().join("report.png");
    let out = headless(&dir.path().join("profile-shot"))
        .args([
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,2400",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        png.len() > 20_000,
        "a screenshot with content: {} bytes",
        png.len()
    );
}
