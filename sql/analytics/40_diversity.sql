-- Diversity: unique word trigrams across instructions and across responses, at an equal sample size
-- (BaF Figure 3). Each subset is cut to the first {{ sample }} rows by id, the smallest subset's size
-- unless `stats --sample` says otherwise.
-- requires: candidates, scored, curated, rewritten
WITH samples AS (
    SELECT 1 AS ord, 'candidates' AS subset, CAST(NULL AS VARCHAR) AS instruction, text AS response
    FROM (SELECT * FROM candidates ORDER BY id LIMIT {{ sample }})
    UNION ALL SELECT 2, 'scored', instruction, text FROM (SELECT * FROM scored ORDER BY id LIMIT {{ sample }})
    UNION ALL SELECT 3, 'curated', instruction, text FROM (SELECT * FROM curated ORDER BY id LIMIT {{ sample }})
    UNION ALL SELECT 4, 'rewritten', instruction, response FROM (SELECT * FROM rewritten ORDER BY id LIMIT {{ sample }})
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
