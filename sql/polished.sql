-- polished (Kun's answer polishment): the rewriter answers each kept instruction from the
-- original text, which it may reword freely; `response` is its whole reply.
WITH called AS (
    SELECT *, polish(instruction, text) AS polish_call
    FROM {{ stage.from }}
)
SELECT *,
       trim(polish_call['text']) AS response,
       CASE
           WHEN polish_call['error'] IS NOT NULL THEN 'llm_error'
           WHEN polish_call['finish_reason'] IN ('content_filter', 'refusal') THEN 'refused'
           WHEN polish_call['finish_reason'] = 'length' THEN 'answer_truncated'
           WHEN trim(polish_call['text']) = '' THEN 'empty_answer'
       END AS _drop
FROM called
