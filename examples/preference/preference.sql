-- preference: for each pair, its best-scored sample is `chosen` and its worst `rejected`
-- (ties go to the earlier sample). A pair whose samples score within
-- {{ stage.min_gap }} of each other is dropped (`no_gap`): it teaches no preference.
WITH ranked AS (
    SELECT *,
           row_number() OVER (PARTITION BY pair_id ORDER BY score DESC, sample) AS best,
           row_number() OVER (PARTITION BY pair_id ORDER BY score ASC, sample) AS worst,
           count(*) OVER (PARTITION BY pair_id) AS samples
    FROM {{ stage.from }}
)
SELECT c.pair_id AS id, c.instruction,
       c.response AS chosen, c.score AS chosen_score, c.sample AS chosen_sample,
       r.response AS rejected, r.score AS rejected_score, r.sample AS rejected_sample,
       c.samples,
       CASE WHEN c.score - r.score < {{ stage.min_gap }} THEN 'no_gap' END AS _drop
FROM ranked c
JOIN ranked r ON c.pair_id = r.pair_id
WHERE c.best = 1 AND r.worst = 1
