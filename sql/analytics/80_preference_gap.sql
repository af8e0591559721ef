-- Preference pairs: the score gap between chosen and rejected
-- A pair whose answers score alike teaches a preference little; a wide gap is a clear lesson.
-- requires: preference
SELECT chosen_score - rejected_score AS gap,
       count(*) AS pairs,
       round(100.0 * count(*) / sum(count(*)) OVER (), 1) AS share_pct,
       round(avg(chosen_score), 2) AS mean_chosen,
       round(avg(rejected_score), 2) AS mean_rejected
FROM preference
GROUP BY chosen_score - rejected_score
ORDER BY gap
