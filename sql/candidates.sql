-- candidates (prepare): cut documents into candidate responses and mark the ones no LLM
-- should see. Mode {{ prepare.mode }}: `document` keeps whole documents (BaF), `segments`
-- keeps the text under each header (Humpback).
--
-- The stage runs one input file at a time; `seen_keys` holds the dedup keys kept by the files
-- before this one, so exact dedup spans the whole input.
--
-- `_drop` names the rule that removed a row (NULL = kept). The runner writes dropped rows to
-- candidates/_dropped/ and counts each reason, so the funnel always adds up.
--
-- Order of the rules: boilerplate lines are stripped from the document (or only counted, in
-- `boilerplate_lines`), units are cut and checked for length and headers, then the quality
-- rules of [prepare.quality], then tokens, then exact dedup. With [prepare.near_dedup] each
-- kept row gets its MinHash signature for the `deduped` stage.
WITH cleaned AS (
    SELECT doc_id, source, metadata, clean_document(text) AS doc
    FROM documents
),
units AS (
    SELECT doc_id, source, metadata, doc['boilerplate_lines'] AS boilerplate_lines,
           unnest(candidate_units(doc['text'], '{{ prepare.mode }}', {{ prepare.min_chars }},
                                  {{ prepare.max_chars }}, {{ prepare.repeat_jaccard }})) AS unit
    FROM cleaned
),
checked AS (
    SELECT *,
           CASE WHEN unit['drop'] IS NULL THEN quality_problem(unit['text'], metadata) END
               AS quality_drop
    FROM units
),
measured AS (
    SELECT doc_id, source, boilerplate_lines,
           unit['ordinal'] AS ordinal,
           unit['header'] AS header,
           unit['text'] AS text,
           -- Token counting is the expensive rule: only units that survived the cheap ones
           -- are counted.
           CASE WHEN unit['drop'] IS NULL AND quality_drop IS NULL
                THEN token_count(unit['text']) END AS n_tokens,
           COALESCE(unit['drop'], quality_drop) AS unit_drop
    FROM checked
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
       boilerplate_lines,
       dedup_key,
{%- if prepare.near_dedup %}
       CASE WHEN rule_drop IS NULL AND NOT seen_before AND copy_rank = 1
            THEN minhash(text) END AS minhash,
{%- endif %}
       COALESCE(rule_drop, CASE WHEN seen_before OR copy_rank > 1 THEN 'duplicate' END) AS _drop
FROM ranked
