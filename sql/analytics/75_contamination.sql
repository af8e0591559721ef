-- Benchmark contamination: rows dropped per benchmark, item field and row column
-- Each row dropped by a decontamination stage records the item it matched; `items` counts the
-- distinct benchmark items found, `mean_overlap` the share of their n-grams found.
WITH m AS (
{%- for s in dropped if s is startingwith("decontaminated") %}
    {% if not loop.first %}UNION ALL {% endif %}SELECT '{{ s }}' AS stage, contamination
    FROM {{ s }}_dropped
{%- else %}
    SELECT '' AS stage, named_struct('benchmark', '', 'item', '', 'field', '', 'column', '',
           'overlap', 0.0) AS contamination WHERE false
{%- endfor %}
)
SELECT stage, contamination['benchmark'] AS benchmark, contamination['field'] AS field,
       contamination['column'] AS "column", count(*) AS "rows",
       count(DISTINCT contamination['item']) AS items,
       round(avg(contamination['overlap']), 3) AS mean_overlap
FROM m
GROUP BY 1, 2, 3, 4
ORDER BY 1, 5 DESC, 2, 3, 4
