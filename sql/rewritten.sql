-- rewritten: the rewriter turns each web text (the draft) into an assistant-quality answer,
-- returned between [RES] and [/RES]. `response` is that answer; `text` stays the original
-- draft so the two can be compared. It reads `{{ stage.from }}`: `curated` in BaF (filter,
-- then rewrite), `backtranslated` in the rewrite-only variant. Every column read is kept.
WITH called AS (
    SELECT *, rewrite(instruction, text) AS rewrite_call
    FROM {{ stage.from }}
)
SELECT *,
       extract_tagged(rewrite_call['text'], 'RES') AS response,
       CASE
           WHEN rewrite_call['error'] IS NOT NULL THEN 'llm_error'
           WHEN rewrite_call['finish_reason'] IN ('content_filter', 'refusal') THEN 'refused'
           ELSE tag_problem(rewrite_call['text'], 'RES', rewrite_call['finish_reason'])
       END AS _drop
FROM called
