-- Dropped rows: per stage and reason, how many, and the shortest one (its first 100 characters)
-- Every row a stage dropped is in the table `<stage>_dropped` (`backforth sql`): read some
-- before trusting a rule's threshold.
WITH d AS (
{%- for s in dropped %}
    {% if not loop.first %}UNION ALL {% endif %}SELECT {{ loop.index }} AS ord, '{{ s }}' AS stage,
           drop_reason AS reason, text
    FROM {{ s }}_dropped
{%- endfor %}
{%- if not dropped %}
    SELECT 0 AS ord, '' AS stage, '' AS reason, '' AS text WHERE false
{%- endif %}
)
SELECT stage, reason, count(*) AS "rows",
       left(regexp_replace(first_value(text ORDER BY character_length(text), text), '\s+', ' ', 'g'), 100) AS shortest
FROM d
GROUP BY ord, stage, reason
ORDER BY ord, 3 DESC, reason
