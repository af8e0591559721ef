//! A built-in stage is one SQL text and one catalog entry, a built-in LLM function one prompt
//! and one catalog entry: added here to a copy of the catalog (not to the source), a job uses
//! them by name alone and runs end to end on the mock.

use backforth::job::catalog::{BuiltinFunction, BuiltinStage, Catalog, ExpectedOutput, MockAnswer};
use backforth::job::file::JobFile;
use backforth::job::{Job, Overrides};
use backforth::run::{RunOptions, run};

use crate::support::util::{count, marker, repo, rows, session};

fn summarize() -> BuiltinFunction {
    BuiltinFunction {
        name: "summarize",
        args: &["text"],
        role: "rewriter",
        template: "Summarise the text below in one line.\n\nText:\n{{ text }}",
        max_tokens: 64,
        expected_output: ExpectedOutput::TimesText(0.2),
        scores: false,
        mock: MockAnswer(|p| {
            let first: Vec<&str> = p.tail.split_whitespace().take(3).collect();
            format!("In short: {}", first.join(" "))
        }),
    }
}

fn summaries() -> BuiltinStage {
    BuiltinStage {
        name: "summaries",
        from: "candidates",
        aliases: &["summarise"],
        default: false,
        sql: "WITH calls AS (SELECT id, text, summarize(text) AS call FROM {{ stage.from }}) \
              SELECT id, text, call['text'] AS summary, call AS summary_call, \
                     CASE WHEN call['error'] IS NOT NULL THEN 'llm_error' END AS _drop \
              FROM calls",
    }
}

fn job_file(out: &std::path::Path) -> JobFile {
    toml::from_str(&format!(
        "output = \"{}\"\n[input]\npaths = [\"examples/data\"]\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"summaries\"\n",
        out.display()
    ))
    .unwrap()
}

#[test]
fn a_stage_and_a_function_added_to_the_catalog_alone_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut catalog = Catalog::builtin().clone();
    catalog.functions.push(summarize());
    catalog.stages.push(summaries());

    // Without the entries, the same job names a stage nobody defined.
    let refused = Job::resolve_in(
        Catalog::builtin(),
        job_file(&out),
        repo(),
        "catalog".into(),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(
        refused.to_string().contains("'summaries' is not built in"),
        "{refused}"
    );

    let job = Job::resolve_in(
        &catalog,
        job_file(&out),
        repo(),
        "catalog".into(),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(job.canonical_stage_name("summarise"), "summaries");
    let function = job
        .functions
        .iter()
        .find(|f| f.name == "summarize")
        .unwrap();
    assert_eq!(function.max_tokens, 2048, "the rewriter role's cap");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let summary = rt.block_on(run(&job, &RunOptions::default())).unwrap();

    let [candidates, summaries] = &summary.stages[..] else {
        panic!("two stages ran: {summary:?}");
    };
    assert!(candidates.rows_out > 10, "{candidates:?}");
    assert_eq!(summaries.rows_in, candidates.rows_out);
    assert_eq!(summaries.rows_out, summaries.rows_in);
    assert_eq!(
        summaries.llm.requests, summaries.rows_in,
        "one call per row"
    );
    // Sharded like any stage reading one earlier stage: a marker per upstream part.
    let published = marker(&out, "summaries");
    assert_eq!(published["shards"], marker(&out, "candidates")["shards"]);

    rt.block_on(async {
        let ctx = session(&out).await;
        assert_eq!(
            count(&ctx, "SELECT count(*) FROM summaries").await,
            candidates.rows_out as i64
        );
        // Each summary is the catalog mock's answer to that row's own text.
        for row in rows(&ctx, "SELECT text, summary FROM summaries").await {
            let first: Vec<&str> = row[0].split_whitespace().take(3).collect();
            assert_eq!(row[1], format!("In short: {}", first.join(" ")));
        }
    });
}

#[test]
fn every_builtin_prompt_puts_its_fixed_instructions_first() {
    // Servers cache prompt prefixes (vLLM's prefix caching, OpenAI's cached input): the fixed
    // instructions must come before any row's text to be read from the cache.
    for function in &Catalog::builtin().functions {
        let template = function.template;
        let fixed: usize = template
            .split("{{")
            .map(|part| part.split_once("}}").map_or(part, |(_, after)| after))
            .map(|text| text.trim().len())
            .sum();
        if fixed < 40 {
            continue;
        }
        let before = template.split("{{").next().unwrap().trim().len();
        assert!(
            before * 4 >= fixed * 3,
            "{}: only {before} of its {fixed} fixed characters come before the first row value",
            function.name
        );
    }
}
