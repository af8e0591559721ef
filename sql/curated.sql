-- curated: self-curation is only a filter over `scored`. Keep pairs scoring at least
-- {{ curate.threshold }} (BaF keeps 5; Humpback's k=4 keeps 4 and 5).
SELECT *,
       CASE
           WHEN score IS NULL THEN concat('no_score:', score_reason)
           WHEN score < {{ curate.threshold }} THEN concat('score_', CAST(score AS VARCHAR))
       END AS _drop
FROM scored
