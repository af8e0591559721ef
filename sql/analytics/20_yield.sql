-- Yield per threshold: pairs kept at k = 3, 4, 5 per scoring iteration, and LLM tokens spent per kept pair
-- (the backtranslation and scoring of every candidate, up to that iteration, divided by the
-- pairs kept).
-- requires: backtranslated, scored
WITH spent AS (
    SELECT 0 AS iteration,
           (SELECT sum(COALESCE(backtranslation['prompt_tokens'], 0)
                       + COALESCE(backtranslation['completion_tokens'], 0)) FROM backtranslated)
         + (SELECT sum(COALESCE(judgement['prompt_tokens'], 0)
                       + COALESCE(judgement['completion_tokens'], 0)) FROM scored) AS tokens
{%- if "rescored" in stages %}
    UNION ALL
    SELECT 1,
           (SELECT sum(COALESCE(backtranslation['prompt_tokens'], 0)
                       + COALESCE(backtranslation['completion_tokens'], 0)) FROM backtranslated)
         + (SELECT sum(COALESCE(judgement['prompt_tokens'], 0)
                       + COALESCE(judgement['completion_tokens'], 0)
                       + COALESCE(judgement_1['prompt_tokens'], 0)
                       + COALESCE(judgement_1['completion_tokens'], 0)) FROM rescored)
{%- endif %}
),
scores AS (
    SELECT 0 AS iteration, score FROM scored
{%- if "rescored" in stages %}
    UNION ALL SELECT 1, score_1 FROM rescored
{%- endif %}
),
kept AS (
    SELECT s.iteration, t.k,
           sum(CASE WHEN s.score >= t.k THEN 1 ELSE 0 END) AS kept,
           count(*) AS scored
    FROM (VALUES (3), (4), (5)) AS t(k) CROSS JOIN scores s
    GROUP BY s.iteration, t.k
)
SELECT concat('score >= ', CAST(k AS VARCHAR)) AS threshold,
       kept.iteration,
       kept,
       round(100.0 * kept / scored, 1) AS percent,
       CASE WHEN kept > 0 THEN CAST(round(CAST(spent.tokens AS DOUBLE) / kept) AS BIGINT) END AS tokens_per_kept_pair
FROM kept JOIN spent ON kept.iteration = spent.iteration
ORDER BY kept.iteration, k
