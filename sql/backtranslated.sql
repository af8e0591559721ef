-- backtranslated: ask the backward model for the instruction each candidate answers.
-- The raw call (text, finish reason, tokens, error) is kept in `backtranslation`;
-- `instruction` is its cleaned text. Rows without an instruction are dropped with a reason.
WITH called AS (
    SELECT id, doc_id, header, text, n_chars, n_tokens, source,
           backtranslate(text) AS backtranslation
    FROM {{ stage.from }}
)
SELECT *,
       clean_instruction(backtranslation['text']) AS instruction,
       CASE
           WHEN backtranslation['error'] IS NOT NULL THEN 'llm_error'
           WHEN backtranslation['finish_reason'] IN ('content_filter', 'refusal') THEN 'refused'
           WHEN backtranslation['finish_reason'] = 'length' THEN 'instruction_truncated'
           WHEN clean_instruction(backtranslation['text']) IS NULL THEN 'empty_instruction'
       END AS _drop
FROM called
