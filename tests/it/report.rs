//! The HTML report in headless Chromium: every plot rendered with its bars, and a document's
//! `<script>` shown as text, never run.

use std::path::PathBuf;
use std::process::Command;

use crate::stats::hand_made_root;
use crate::support::util::backforth_ok;

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
    // The final pair carries the hostile text: the report samples `rewritten`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(crate::support::util::copy_to_parquet(
        &datafusion::prelude::SessionContext::new(),
        "SELECT 'a' AS id, 'what happened <script>alert(1)</script>' AS instruction, \
         'the cat sat on the mat' AS text, 'the cat sat on the mat today' AS response",
        &root.join("rewritten/part-00000.parquet"),
    ));
    let html = dir.path().join("report.html");
    let pngs = dir.path().join("png");
    backforth_ok(&[
        "report",
        root.to_str().unwrap(),
        "--out",
        html.to_str().unwrap(),
        "--png",
        pngs.to_str().unwrap(),
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
    // Score histograms of iterations 0 and 1 with 3 bars each, yield 6 (3 thresholds x 2
    // iterations), lengths 5, diversity 5; the transition matrix 3 rows x 6 cells.
    assert_eq!(dom.matches("<svg").count(), 6, "{dom}");
    assert_eq!(dom.matches("<rect class=\"bar\"").count(), 22);
    assert_eq!(dom.matches("<rect class=\"cell\"").count(), 18);
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

#[test]
fn report_png_plots_have_bars_and_text() {
    use resvg::tiny_skia::Pixmap;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    hand_made_root(&root);
    let pngs = dir.path().join("png");
    backforth_ok(&[
        "report",
        root.to_str().unwrap(),
        "--out",
        dir.path().join("report.html").to_str().unwrap(),
        "--png",
        pngs.to_str().unwrap(),
    ]);
    let mut names: Vec<String> = std::fs::read_dir(&pngs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "diversity.png",
            "lengths.png",
            "score_histogram_it0_m0.png",
            "score_histogram_it1_m1.png",
            "score_transitions.png",
            "yield.png",
        ]
    );
    for name in &names {
        let pixmap = Pixmap::load_png(pngs.join(name)).unwrap();
        let pixels = pixmap.pixels();
        let bar = pixels
            .iter()
            .filter(|p| (p.red(), p.green(), p.blue()) == (0x4a, 0x7a, 0xb8))
            .count();
        // Glyphs are drawn: near-black pixels, beside the white background.
        let ink = pixels
            .iter()
            .filter(|p| p.red() < 60 && p.green() < 60 && p.blue() < 60)
            .count();
        let white = pixels
            .iter()
            .filter(|p| p.red() == 255 && p.green() == 255)
            .count();
        assert!(ink > 200, "{name}: {ink} text pixels");
        assert!(white > pixels.len() / 4, "{name}: a white background");
        if name != "score_transitions.png" {
            assert!(bar > 1000, "{name}: {bar} bar pixels");
        }
    }
}

/// The report's pairs are the final ones: from `rewritten`, each answer with the web text it
/// was rewritten from beside it, not the web text shown as the response.
#[test]
fn report_samples_rewritten_pairs_beside_their_original_text() {
    use crate::support::fake_server::FakeServer;
    let dir = tempfile::tempdir().unwrap();
    crate::crash::corpus(dir.path());
    let server = FakeServer::start(std::time::Duration::from_millis(1));
    let root = dir.path().join("out");
    let job = dir.path().join("job.toml");
    backforth_ok(&[
        "run",
        job.to_str().unwrap(),
        "--output",
        root.to_str().unwrap(),
        "--endpoint",
        &server.url(),
        "--model",
        "m",
    ]);
    let html = dir.path().join("report.html");
    backforth_ok(&[
        "report",
        root.to_str().unwrap(),
        "--out",
        html.to_str().unwrap(),
    ]);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("<b>Original text</b>"),
        "no original text shown"
    );
    assert!(
        !page.contains("(not rewritten)"),
        "web text shown as a response"
    );
    // A rewritten response of the run is among the samples.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let responses = rt.block_on(async {
        let ctx = crate::support::util::session(&root).await;
        crate::support::util::rows(&ctx, "SELECT response FROM rewritten").await
    });
    assert!(
        responses
            .iter()
            .any(|r| page.contains(&r[0].replace('&', "&amp;").replace('<', "&lt;"))),
        "no rewritten response in the report"
    );
}
