-- scored: the scorer rates every (instruction, response) pair on the 5-point rubric.
-- Every score is kept, valid or not: `score` is 1-5 or NULL, and `score_reason` says why it
-- is NULL (no_score, not_integer, out_of_range, truncated, no_output, llm_error).
-- With `[functions.score_pair] mode = "logprobs"`, `score_expected` is the expected score over
-- the digits 1-5 of the first token, `score_mass` the probability those digits hold, and
-- `score` its rounding; `score_source` says whether logprobs or the text judgement was used.
-- Thresholds are applied in `curated`, so changing one never calls the LLM again.
WITH judged AS (
    SELECT id, doc_id, header, text, n_chars, n_tokens, source, instruction,
           score_pair(instruction, text) AS judgement
    FROM backtranslated
),
parsed AS (
    SELECT *,
           parse_score(judgement['text'], judgement['finish_reason']) AS parsed,
           logprob_score(judgement['top_logprobs']) AS weighed
    FROM judged
)
SELECT id, doc_id, header, text, n_chars, n_tokens, source, instruction, judgement,
       CASE
           WHEN weighed['expected'] IS NOT NULL THEN CAST(round(weighed['expected']) AS BIGINT)
           ELSE parsed['score']
       END AS score,
       CASE
           WHEN judgement['error'] IS NOT NULL THEN 'llm_error'
           WHEN weighed['expected'] IS NOT NULL THEN NULL
           ELSE parsed['reason']
       END AS score_reason,
       weighed['expected'] AS score_expected,
       weighed['mass'] AS score_mass,
       CASE
           WHEN judgement['error'] IS NOT NULL THEN NULL
           WHEN weighed['expected'] IS NOT NULL THEN 'logprobs'
           ELSE 'text'
       END AS score_source
FROM parsed
