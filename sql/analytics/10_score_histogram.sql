-- Score histogram: pairs by score per scoring iteration and model, unparseable ones by reason
-- Iteration 0 is `scored` (M0); iteration 1 is `rescored` (M1), when the job has it.
-- `percent` is within the iteration and model.
-- requires: scored
WITH scores AS (
    SELECT 0 AS iteration, score_model AS model, score, score_reason AS reason FROM scored
{%- if "rescored" in stages %}
    UNION ALL
    SELECT 1, score_model_1, score_1, score_reason_1 FROM rescored
{%- endif %}
)
SELECT iteration, model,
       COALESCE(CAST(score AS VARCHAR), concat('none (', reason, ')')) AS score,
       count(*) AS pairs,
       round(100.0 * count(*) / sum(count(*)) OVER (PARTITION BY iteration, model), 1) AS percent
FROM scores
GROUP BY iteration, model, 3
ORDER BY iteration, model, 3
