-- Rewrite overlap: share of each rewrite's word trigrams found in its draft, and the change in length
-- For every stage that wrote a `response` beside the web `text` (rewritten, polished, ...).
-- Near 1: the answer copies the draft (as the rewrite prompt asks); near 0: it wrote something new.
-- requires: candidates
WITH o AS (
{%- for s in rewrites %}
    {% if not loop.first %}UNION ALL {% endif %}SELECT {{ loop.index }} AS ord, '{{ s }}' AS subset,
           trigram_overlap(response, text) AS overlap,
           token_count(response) - token_count(text) AS token_change
    FROM {{ s }}
{%- endfor %}
{%- if not rewrites %}
    SELECT 0 AS ord, '' AS subset, CAST(NULL AS DOUBLE) AS overlap, 0 AS token_change WHERE false
{%- endif %}
)
SELECT subset, count(*) AS rewrites,
       round(avg(overlap), 3) AS mean_overlap,
       round(approx_percentile_cont(overlap, 0.1), 3) AS p10,
       round(approx_percentile_cont(overlap, 0.5), 3) AS median,
       round(approx_percentile_cont(overlap, 0.9), 3) AS p90,
       round(avg(token_change), 1) AS mean_token_change
FROM o
GROUP BY ord, subset
ORDER BY ord
