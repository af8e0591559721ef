-- distilled (baseline): the same chat model answers each instruction of `{{ stage.from }}`
-- without seeing the web text, as BaF's distillation comparison.
WITH called AS (
    SELECT *, answer(instruction) AS answer_call
    FROM {{ stage.from }}
)
SELECT *,
       trim(answer_call['text']) AS response,
       CASE
           WHEN answer_call['error'] IS NOT NULL THEN 'llm_error'
           WHEN answer_call['finish_reason'] IN ('content_filter', 'refusal') THEN 'refused'
           WHEN answer_call['finish_reason'] = 'length' THEN 'answer_truncated'
           WHEN trim(answer_call['text']) = '' THEN 'empty_answer'
       END AS _drop
FROM called
