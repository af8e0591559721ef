-- Score transitions: how M1 (iteration 1) re-scored the pairs M0 (iteration 0) gave each score
-- One row per iteration-0 score; `to_N` counts the pairs iteration 1 gave N, `to_none` those it
-- could not score. The diagonal is agreement.
-- requires: rescored
SELECT COALESCE(CAST(score AS VARCHAR), 'none') AS from_score,
       sum(CASE WHEN score_1 = 1 THEN 1 ELSE 0 END) AS to_1,
       sum(CASE WHEN score_1 = 2 THEN 1 ELSE 0 END) AS to_2,
       sum(CASE WHEN score_1 = 3 THEN 1 ELSE 0 END) AS to_3,
       sum(CASE WHEN score_1 = 4 THEN 1 ELSE 0 END) AS to_4,
       sum(CASE WHEN score_1 = 5 THEN 1 ELSE 0 END) AS to_5,
       sum(CASE WHEN score_1 IS NULL THEN 1 ELSE 0 END) AS to_none,
       count(*) AS pairs
FROM rescored
GROUP BY 1
ORDER BY 1
