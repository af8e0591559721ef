-- Judge agreement: precision and recall of "kept" against human labels (`stats --labels`)
-- Humpback reports M0 0.44 / 0.09, M1 0.52 / 0.44 and GPT-4 0.88 / 0.92 on its 250 pairs.
-- requires: scored, curated, labels
WITH judged AS (
    SELECT l.label, c.id IS NOT NULL AS kept
    FROM scored s
    JOIN labels l ON l.id = s.id
    LEFT JOIN curated c ON c.id = s.id
),
counts AS (
    SELECT count(*) AS labelled,
           sum(CASE WHEN kept AND label THEN 1 ELSE 0 END) AS tp,
           sum(CASE WHEN kept AND NOT label THEN 1 ELSE 0 END) AS fp,
           sum(CASE WHEN NOT kept AND label THEN 1 ELSE 0 END) AS fn_
    FROM judged
)
SELECT labelled,
       tp AS kept_and_good,
       fp AS kept_but_bad,
       fn_ AS dropped_but_good,
       CASE WHEN tp + fp > 0 THEN round(CAST(tp AS DOUBLE) / (tp + fp), 3) END AS precision,
       CASE WHEN tp + fn_ > 0 THEN round(CAST(tp AS DOUBLE) / (tp + fn_), 3) END AS recall
FROM counts
