-- Lengths of the distilled baseline (instruction and direct answer), mean and std
-- requires: distilled
WITH measured AS (
    SELECT character_length(instruction) AS ic, token_count(instruction) AS it,
           character_length(response) AS rc, token_count(response) AS rt
    FROM distilled
)
SELECT 'distilled' AS subset, count(*) AS n,
       round(avg(ic), 1) AS instruction_chars, round(stddev(ic), 1) AS instruction_chars_std,
       round(avg(it), 1) AS instruction_tokens, round(stddev(it), 1) AS instruction_tokens_std,
       round(avg(rc), 1) AS response_chars, round(stddev(rc), 1) AS response_chars_std,
       round(avg(rt), 1) AS response_tokens, round(stddev(rt), 1) AS response_tokens_std
FROM measured
