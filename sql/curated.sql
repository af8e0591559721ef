-- curated: self-curation is only a filter over the scores. Keep pairs scoring at least
-- {{ curate.threshold }} (BaF keeps 5; Humpback's k=4 keeps 4 and 5) at scoring iteration
-- {{ curate.iteration }} (0: `scored`, M0; 1: `rescored`, M1).
{%- set suffix = "" if curate.iteration == 0 else "_" ~ curate.iteration %}
{%- set table = stage.from if curate.iteration == 0 else "rescored" %}
SELECT *,
       CASE
           WHEN score{{ suffix }} IS NULL THEN concat('no_score:', score_reason{{ suffix }})
           WHEN score{{ suffix }} < {{ curate.threshold }}
               THEN concat('score_', CAST(score{{ suffix }} AS VARCHAR))
       END AS _drop
FROM {{ table }}
