-- Lengths per subset, mean and std, in characters (Humpback Table 2) and tokens (BaF Table 6)
-- Subsets are the candidates, every stage with instructions (the response is `response` where
-- the stage wrote one, else the web text), and the seed pairs with `stats --seed`.
-- Tokens use `stats --tokenizer` (default cl100k_base, an approximation for other models).
-- requires: candidates
WITH subsets AS (
{%- for s in subsets %}
    {% if not loop.first %}UNION ALL {% endif %}SELECT {{ loop.index }} AS ord, '{{ s.name }}' AS subset,
           {{ s.instruction }} AS instruction, {{ s.response }} AS response FROM {{ s.name }}
{%- endfor %}
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
