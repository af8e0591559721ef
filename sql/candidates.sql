-- candidates (prepare): cut documents into candidate responses and mark the ones no LLM
-- should see. Mode {{ prepare.mode }}: `document` keeps whole documents (BaF), `segments`
-- keeps the text under each header (Humpback).
--
-- The stage runs one input file at a time; `seen_keys` holds the dedup keys kept by the files
-- before this one, so exact dedup spans the whole input.
--
-- `_drop` names the rule that removed a row (NULL = kept). The runner writes dropped rows to
-- candidates/_dropped/ and counts each reason, so the funnel always adds up.
WITH units AS (
    SELECT doc_id, source,
           unnest(candidate_units(text, '{{ prepare.mode }}', {{ prepare.min_chars }},
                                  {{ prepare.max_chars }}, {{ prepare.repeat_jaccard }})) AS unit
    FROM documents
),
measured AS (
    SELECT doc_id, source,
           unit['ordinal'] AS ordinal,
           unit['header'] AS header,
           unit['text'] AS text,
           -- Token counting is the expensive rule: only units that survived the cheap ones
           -- are counted.
           CASE WHEN unit['drop'] IS NULL THEN token_count(unit['text']) END AS n_tokens,
           unit['drop'] AS unit_drop
    FROM units
),
ruled AS (
    SELECT *,
           COALESCE(unit_drop,
                    CASE WHEN n_tokens > {{ prepare.max_tokens }} THEN 'too_many_tokens' END)
               AS rule_drop,
           dedup_key(text) AS dedup_key
    FROM measured
),
ranked AS (
    -- Exact dedup on normalised text: the first kept copy (by doc_id, ordinal) survives,
    -- unless an earlier file already kept the same text.
    SELECT r.*,
           row_number() OVER (PARTITION BY r.dedup_key
                              ORDER BY r.rule_drop IS NOT NULL, r.doc_id, r.ordinal) AS copy_rank,
           s.dedup_key IS NOT NULL AS seen_before
    FROM ruled r LEFT JOIN seen_keys s ON r.dedup_key = s.dedup_key
)
SELECT concat(doc_id, '#', CAST(ordinal AS VARCHAR)) AS id,
       doc_id,
       ordinal,
       header,
       text,
       CAST(character_length(text) AS BIGINT) AS n_chars,
       n_tokens,
       source,
       dedup_key,
       COALESCE(rule_drop, CASE WHEN seen_before OR copy_rank > 1 THEN 'duplicate' END) AS _drop
FROM ranked
