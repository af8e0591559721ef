-- filtered: post-filters on final answers (Kun's, usable after any stage with `response`,
-- here `{{ stage.from }}`). Each rule is a pure function, so no LLM is called, and each drop
-- is counted under its own reason; `filter_match` shows the phrase or count that triggered
-- it. Settings: stage vars `min_chars` (default 20) and `max_repeats` (default 5: a word
-- sequence repeated back to back more than five times is a model looping).
WITH checked AS (
    SELECT *,
           refusal_phrase(response) AS refusal,
           self_reference_phrase(response) AS self_reference,
           max_repeats(response) AS repeats
    FROM {{ stage.from }}
)
SELECT * EXCLUDE (refusal, self_reference, repeats),
       COALESCE(refusal, self_reference,
                CASE WHEN repeats > {{ stage.max_repeats | default(5) }}
                     THEN concat(CAST(repeats AS VARCHAR), ' repeats') END) AS filter_match,
       CASE
           WHEN refusal IS NOT NULL THEN 'refusal'
           WHEN self_reference IS NOT NULL THEN 'self_reference'
           WHEN character_length(response) < {{ stage.min_chars | default(20) }} THEN 'too_short'
           WHEN repeats > {{ stage.max_repeats | default(5) }} THEN 'repetition'
       END AS _drop
FROM checked
