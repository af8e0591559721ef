//! Objects under an output root: JSON markers, Parquet parts, deletes that tolerate absence.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::schema::types::ColumnPath;
use object_store::{ObjectStoreExt, PutPayload};

use crate::error::{Context, Result};
use crate::root::names::{
    DEDUP_KEY_COLUMN, DROPPED_DIR, SHARDS_DIR, is_part_of_input_shard, part_id_of_file,
};
use crate::storage::{Location, delete_if_exists};

/// zstd level of every Parquet part a stage writes (the prepare benchmark's floor uses it too).
pub const PART_ZSTD_LEVEL: i32 = 1;

/// The URL DataFusion reads the object at `path` by.
pub fn object_url(root: &Location, path: &object_store::path::Path) -> String {
    format!(
        "{}/{}",
        root.store_url.as_str().trim_end_matches('/'),
        path.as_ref()
    )
}

/// Deletes the parts of input shard `id` directly under `dir`.
pub async fn delete_parts_of(dir: &Location, id: &str) -> Result<()> {
    let listing = dir.store.list_with_delimiter(Some(&dir.prefix)).await?;
    for meta in listing.objects {
        if meta
            .location
            .filename()
            .is_some_and(|n| is_part_of_input_shard(n, id))
        {
            delete_if_exists(dir, &meta.location).await?;
        }
    }
    Ok(())
}

/// Reads the Parquet object at `path` whole.
pub async fn read_parquet_object(
    root: &Location,
    path: &object_store::path::Path,
) -> Result<Vec<RecordBatch>> {
    let bytes = root.store.get(path).await?.bytes().await?;
    let reader =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .with_context(|| format!("reading {}", root.display(path)))?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", root.display(path)))
}

/// Writes `batches` as one Parquet object at `path`, encoded as stage parts are.
pub async fn write_parquet_object(
    root: &Location,
    path: &object_store::path::Path,
    batches: &[RecordBatch],
) -> Result<()> {
    let Some(first) = batches.first() else {
        return Ok(());
    };
    let props = part_properties(&first.schema());
    let bytes = parquet_of(batches, first.schema(), Some(props))?;
    root.store.put(path, PutPayload::from(bytes)).await?;
    Ok(())
}

/// How parts are written: zstd at [`PART_ZSTD_LEVEL`], row groups of 64 Ki rows; columns of
/// hash values (`minhash` signatures, `dedup_key`) and of values unique per row (`text`, `id`,
/// `doc_id`) skip dictionary encoding, which never pays off there: the writer hashed every
/// value until its dictionary overflowed, then compressed that dictionary too. Signatures are
/// stored uncompressed, since zstd cannot shrink them.
pub fn part_properties(schema: &Schema) -> WriterProperties {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(PART_ZSTD_LEVEL).expect("valid level"),
        ))
        .set_max_row_group_row_count(Some(64 * 1024));
    if let Ok(field) = schema.field_with_name("minhash")
        && let DataType::List(item) = field.data_type()
    {
        let path = ColumnPath::new(vec!["minhash".into(), "list".into(), item.name().clone()]);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_compression(path, Compression::UNCOMPRESSED);
    }
    for unique in [DEDUP_KEY_COLUMN, "text", "id", "doc_id"] {
        if schema.field_with_name(unique).is_ok() {
            props = props.set_column_dictionary_enabled(ColumnPath::from(unique), false);
        }
    }
    props.build()
}

/// `batches` encoded as one Parquet file in memory.
pub fn parquet_of(
    batches: &[RecordBatch],
    schema: SchemaRef,
    props: Option<WriterProperties>,
) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(&mut buf, schema, props)
        .with_context(|| format!("Parquet writer"))?;
    for batch in batches {
        writer
            .write(batch)
            .with_context(|| format!("writing Parquet"))?;
    }
    writer.close().with_context(|| format!("closing Parquet"))?;
    Ok(buf)
}

/// Deletes from the stage folder `dir` every shard not in `keep`: its marker, its parts and
/// its dropped rows (`shard_of` maps a part id to its shard id). What is left over from an
/// input file that is gone, or from an input set numbered differently, must not stay in
/// the stage's table. Returns how many objects were deleted.
pub async fn remove_shards_except(
    dir: &Location,
    keep: &std::collections::BTreeSet<String>,
    shard_of: impl Fn(&str) -> &str,
) -> Result<usize> {
    let mut removed = 0;
    for folder in [dir.clone(), dir.child(DROPPED_DIR), dir.child(SHARDS_DIR)] {
        let listing = folder
            .store
            .list_with_delimiter(Some(&folder.prefix))
            .await?;
        for meta in listing.objects {
            let Some(name) = meta.location.filename() else {
                continue;
            };
            let shard = match name.strip_suffix(".json") {
                Some(id) if folder.prefix.as_ref().ends_with(SHARDS_DIR) => id,
                _ => match part_id_of_file(name) {
                    Some(part) => shard_of(part),
                    None => continue,
                },
            };
            if !keep.contains(shard) {
                delete_if_exists(&folder, &meta.location).await?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}
