-- Diversity: unique word trigrams across instructions and across responses, at an equal sample size
-- (BaF Figure 3). Each subset (as in the lengths table) is cut to its first {{ sample }} rows
-- by id, the smallest subset's size unless `stats --sample` says otherwise.
-- requires: candidates
WITH samples AS (
{%- for s in subsets %}
    {% if not loop.first %}UNION ALL {% endif %}SELECT {{ loop.index }} AS ord, '{{ s.name }}' AS subset,
           {{ s.instruction }} AS instruction, {{ s.response }} AS response
    FROM (SELECT * FROM {{ s.name }} ORDER BY id LIMIT {{ sample }})
{%- endfor %}
),
instruction_grams AS (
    SELECT ord, subset, unnest(word_trigrams(instruction)) AS gram FROM samples
),
response_grams AS (
    SELECT ord, subset, unnest(word_trigrams(response)) AS gram FROM samples
),
counted AS (
    SELECT ord, subset, count(*) AS rows_sampled FROM samples GROUP BY ord, subset
)
SELECT c.subset, c.rows_sampled,
       COALESCE(ig.n, 0) AS instruction_trigrams,
       COALESCE(rg.n, 0) AS response_trigrams
FROM counted c
LEFT JOIN (SELECT ord, count(DISTINCT gram) AS n FROM instruction_grams GROUP BY ord) ig ON ig.ord = c.ord
LEFT JOIN (SELECT ord, count(DISTINCT gram) AS n FROM response_grams GROUP BY ord) rg ON rg.ord = c.ord
ORDER BY c.ord
