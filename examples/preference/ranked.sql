-- ranked: every sample on a row of its own (`id` is the pair's id and the sample's number),
-- its answer cut from the [RES] tags and judged alone by `judge_json` ({reason, score}).
WITH each AS (
    SELECT id AS pair_id, instruction, rewrites,
           unnest(range(1, CAST(cardinality(rewrites) AS BIGINT) + 1)) AS sample
    FROM {{ stage.from }}
),
answered AS (
    SELECT concat(pair_id, '/', CAST(sample AS VARCHAR)) AS id, pair_id, sample, instruction,
           extract_tagged(rewrites[sample]['text'], 'RES') AS response,
           rewrites[sample]['error'] AS rewrite_error
    FROM each
),
judged AS (
    SELECT *, judge_json(instruction, response) AS judgement
    FROM answered
),
read AS (
    SELECT *,
           judge_score(judgement['text'], judgement['finish_reason'], judgement['error'],
                       judgement['top_logprobs']) AS j
    FROM judged
)
SELECT id, pair_id, sample, instruction, response, judgement,
       j['score'] AS score,
       CASE
           WHEN rewrite_error IS NOT NULL THEN 'llm_error'
           WHEN response IS NULL THEN 'missing_tag'
           WHEN j['score'] IS NULL THEN concat('no_score:', j['reason'])
       END AS _drop
FROM read
