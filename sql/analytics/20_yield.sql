-- Yield per threshold: pairs kept at k = 3, 4, 5, and LLM tokens spent per kept pair
-- (the backtranslation and scoring of every candidate, divided by the pairs kept).
-- requires: backtranslated, scored
WITH spent AS (
    SELECT (SELECT sum(COALESCE(backtranslation['prompt_tokens'], 0)
                       + COALESCE(backtranslation['completion_tokens'], 0)) FROM backtranslated)
         + (SELECT sum(COALESCE(judgement['prompt_tokens'], 0)
                       + COALESCE(judgement['completion_tokens'], 0)) FROM scored) AS tokens
),
kept AS (
    SELECT t.k,
           sum(CASE WHEN s.score >= t.k THEN 1 ELSE 0 END) AS kept,
           count(*) AS scored
    FROM (VALUES (3), (4), (5)) AS t(k) CROSS JOIN scored s
    GROUP BY t.k
)
SELECT concat('score >= ', CAST(k AS VARCHAR)) AS threshold,
       kept,
       round(100.0 * kept / scored, 1) AS percent,
       CASE WHEN kept > 0 THEN CAST(round(CAST(spent.tokens AS DOUBLE) / kept) AS BIGINT) END AS tokens_per_kept_pair
FROM kept CROSS JOIN spent
ORDER BY k
