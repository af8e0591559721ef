-- scored: the scorer rates every (instruction, response) pair on the 5-point rubric; this is
-- iteration 0 of self-curation (Humpback's M0; BaF's only scorer).
-- Every score is kept, valid or not: `score` is 1-5 or NULL, and `score_reason` says why it
-- is NULL (no_score, not_integer, out_of_range, truncated, no_output, refused, llm_error).
-- With `[functions.score_pair] mode = "logprobs"`, `score_expected` is the expected score over
-- the digits 1-5 of the first token, `score_mass` the probability those digits hold, and
-- `score` its rounding; `score_source` says whether logprobs or the text judgement was used.
-- `score_model` names the model that judged, so histograms can be split by judge.
-- Thresholds are applied in `curated`, so changing one never calls the LLM again.
WITH judged AS (
    SELECT id, doc_id, header, text, n_chars, n_tokens, source, instruction,
           score_pair(instruction, text) AS judgement
    FROM {{ stage.from }}
),
read AS (
    SELECT *,
           judge_score(judgement['text'], judgement['finish_reason'], judgement['error'],
                       judgement['top_logprobs']) AS j
    FROM judged
)
SELECT id, doc_id, header, text, n_chars, n_tokens, source, instruction, judgement,
       j['score'] AS score,
       j['reason'] AS score_reason,
       j['expected'] AS score_expected,
       j['mass'] AS score_mass,
       j['source'] AS score_source,
       {{ functions.score_pair.model | sql_string }} AS score_model
FROM read
