-- judged (Kun): judge each instruction alone, good or bad, before any answer is written.
-- Instructions that point at a document the final user will not have ("the article",
-- "according to", ...) are dropped first, without an LLM call; the rest go to
-- `judge_instruction`, and only `good` is kept. `verdict_reason` says why there is no
-- verdict (no_verdict, truncated, no_output, both).
WITH screened AS (
    SELECT *, source_reference_phrase(instruction) AS source_reference
    FROM {{ stage.from }}
),
called AS (
    SELECT *,
           CASE WHEN source_reference IS NULL THEN judge_instruction(instruction) END
               AS instruction_judgement
    FROM screened
),
read AS (
    SELECT *,
           parse_verdict(instruction_judgement['text'], instruction_judgement['finish_reason'])
               AS v
    FROM called
)
SELECT * EXCLUDE (v),
       v['verdict'] AS verdict,
       v['reason'] AS verdict_reason,
       CASE
           WHEN source_reference IS NOT NULL THEN 'instruction_refers_to_source'
           WHEN instruction_judgement['error'] IS NOT NULL THEN 'llm_error'
           WHEN instruction_judgement['finish_reason'] IN ('content_filter', 'refusal') THEN 'refused'
           WHEN v['verdict'] IS NULL THEN concat('no_verdict:', v['reason'])
           WHEN v['verdict'] = 'bad' THEN 'judged_bad'
       END AS _drop
FROM read
