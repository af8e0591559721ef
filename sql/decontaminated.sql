-- decontaminated: drops rows sharing word n-grams with an item of the benchmarks named in
-- [decontaminate] (n-gram length, measure and threshold there; text is compared lower-cased,
-- with punctuation, whitespace and line breaks as mere word breaks). On candidates it checks
-- `text`, so contaminated web text never costs an LLM call; on pairs, `instruction` and
-- `response`; `vars = { columns = [...] }` names others.
-- `contamination` says which benchmark, item, item field and row column matched, how many
-- n-grams they share and the share of the item's n-grams found; NULL when the row is clean.
{%- if stage.columns is defined %}{% set columns = stage.columns %}
{%- elif stage.from in ["candidates", "deduped"] %}{% set columns = ["text"] %}
{%- else %}{% set columns = ["instruction", "response"] %}{% endif %}
WITH checked AS (
    SELECT *,
           benchmark_match({% for c in columns %}{{ c | sql_string }}, {{ c }}{% if not loop.last %}, {% endif %}{% endfor %}) AS contamination
    FROM {{ stage.from }}
)
SELECT *,
       CASE WHEN contamination IS NOT NULL
            THEN concat('contaminated:', contamination['benchmark'])
       END AS _drop
FROM checked
