-- deduped: near-duplicate removal across the whole input. `near_duplicates` (id, kept_id,
-- similarity) is computed by the runner from the `minhash` signatures of every row of
-- `{{ stage.from }}` (so `[prepare.near_dedup]` must be set): LSH bands give candidate pairs,
-- pairs whose estimated Jaccard similarity reaches the threshold are joined into clusters,
-- and each cluster keeps its smallest id. The result is the same whatever the shard order or
-- worker split. Exact duplicates were already dropped in `candidates`.
SELECT c.* EXCLUDE (minhash),
       n.kept_id AS near_duplicate_of,
       n.similarity AS near_duplicate_similarity,
       CASE WHEN n.kept_id IS NOT NULL THEN 'near_duplicate' END AS _drop
FROM {{ stage.from }} c
LEFT JOIN near_duplicates n ON c.id = n.id
