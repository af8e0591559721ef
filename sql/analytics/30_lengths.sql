-- Lengths per subset, mean and std, in characters (Humpback Table 2) and tokens (BaF Table 6)
-- Tokens use `stats --tokenizer` (default cl100k_base, an approximation for other models).
-- requires: candidates, scored, curated, rewritten
WITH subsets AS (
    SELECT 1 AS ord, 'candidates' AS subset, CAST(NULL AS VARCHAR) AS instruction, text AS response
    FROM candidates
    UNION ALL SELECT 2, 'scored', instruction, text FROM scored
    UNION ALL SELECT 3, 'curated', instruction, text FROM curated
    UNION ALL SELECT 4, 'rewritten', instruction, response FROM rewritten
),
measured AS (
    SELECT ord, subset,
           character_length(instruction) AS ic, token_count(instruction) AS it,
           character_length(response) AS rc, token_count(response) AS rt
    FROM subsets
)
SELECT subset, count(*) AS n,
       round(avg(ic), 1) AS instruction_chars, round(stddev(ic), 1) AS instruction_chars_std,
       round(avg(it), 1) AS instruction_tokens, round(stddev(it), 1) AS instruction_tokens_std,
       round(avg(rc), 1) AS response_chars, round(stddev(rc), 1) AS response_chars_std,
       round(avg(rt), 1) AS response_tokens, round(stddev(rt), 1) AS response_tokens_std
FROM measured
GROUP BY ord, subset
ORDER BY ord
