-- scored: the scorer rates every (instruction, response) pair on the 5-point rubric.
-- Every score is kept, valid or not: `score` is 1-5 or NULL, and `score_reason` says why it
-- is NULL (no_score, not_integer, out_of_range, truncated, no_output, llm_error).
-- Thresholds are applied in `curated`, so changing one never calls the LLM again.
WITH judged AS (
    SELECT id, doc_id, header, text, n_chars, n_tokens, source, instruction,
           score_pair(instruction, text) AS judgement
    FROM backtranslated
),
parsed AS (
    SELECT *, parse_score(judgement['text'], judgement['finish_reason']) AS parsed
    FROM judged
)
SELECT id, doc_id, header, text, n_chars, n_tokens, source, instruction, judgement,
       parsed['score'] AS score,
       CASE WHEN judgement['error'] IS NOT NULL THEN 'llm_error' ELSE parsed['reason'] END
           AS score_reason
FROM parsed
