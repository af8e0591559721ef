//! Each stage's output schema is the one written down in `schemas/`.
//! `BACKFORTH_BLESS=1 cargo test schemas` rewrites the files from a run; review the diff.

use backforth::root::tables::schema_doc;
use datafusion::prelude::SessionContext;

use crate::pipeline::{STAGES, sample_root};
use crate::support::util::repo;

#[test]
fn stage_outputs_match_schemas_dir() {
    let root = sample_root();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for stage in STAGES {
        let schema = rt.block_on(async {
            let ctx = SessionContext::new();
            let df = ctx
                .read_parquet(root.join(stage).to_str().unwrap(), Default::default())
                .await
                .unwrap();
            df.schema().as_arrow().clone()
        });
        let actual = serde_json::to_string_pretty(&schema_doc(&schema)).unwrap() + "\n";
        let path = repo().join("schemas").join(format!("{stage}.json"));
        if std::env::var_os("BACKFORTH_BLESS").is_some() {
            std::fs::write(&path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (BACKFORTH_BLESS=1 writes it)", path.display()));
        assert_eq!(
            actual,
            expected,
            "schema of stage {stage} differs from {}",
            path.display()
        );
    }
}
