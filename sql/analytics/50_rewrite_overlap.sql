-- Rewrite overlap: share of each rewrite's word trigrams found in its draft, and the change in length
-- Near 1: the rewrite copies the draft (as the prompt asks); near 0: it wrote something new.
-- requires: rewritten
WITH o AS (
    SELECT trigram_overlap(response, text) AS overlap,
           token_count(response) - token_count(text) AS token_change
    FROM rewritten
)
SELECT count(*) AS rewrites,
       round(avg(overlap), 3) AS mean_overlap,
       round(approx_percentile_cont(overlap, 0.1), 3) AS p10,
       round(approx_percentile_cont(overlap, 0.5), 3) AS median,
       round(approx_percentile_cont(overlap, 0.9), 3) AS p90,
       round(avg(token_change), 1) AS mean_token_change
FROM o
