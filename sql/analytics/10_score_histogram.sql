-- Score histogram: every pair of `scored` by score, and the unparseable ones by reason.
-- requires: scored
SELECT COALESCE(CAST(score AS VARCHAR), concat('none (', score_reason, ')')) AS score,
       count(*) AS pairs,
       round(100.0 * count(*) / sum(count(*)) OVER (), 1) AS percent
FROM scored
GROUP BY 1
ORDER BY 1
