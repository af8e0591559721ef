-- candidates (prepare): cut documents into candidate responses and mark the ones no LLM
-- should see. Mode {{ prepare.mode }}: `document` keeps whole documents (BaF), `segments`
-- keeps the text under each header (Humpback).
--
-- The stage runs on each input file (shard) separately and in parallel. Exact dedup is the
-- runner's, on `dedup_key`: within a file the first kept copy survives and the later ones are
-- dropped as `duplicate`; once every shard is done, rows whose text a file earlier by path
-- already kept are dropped as `duplicate_across_files`. So the result does not depend on the
-- order the shards ran in.
--
-- `_drop` names the rule that removed a row (NULL = kept). The runner writes dropped rows to
-- candidates/_dropped/ and counts each reason, so the funnel always adds up.
--
-- Order of the rules: boilerplate lines are stripped from the document (or only counted, in
-- `boilerplate_lines`), units are cut and checked for length and headers, then the quality
-- rules of [prepare.quality], then tokens. With [prepare.near_dedup] each kept row gets its
-- MinHash signature for the `deduped` stage.
WITH cleaned AS (
    SELECT doc_id, source, metadata, file, line, clean_document(text) AS doc
    FROM documents
),
units AS (
    SELECT doc_id, source, metadata, file, line, doc['boilerplate_lines'] AS boilerplate_lines,
{%- if prepare.mode == "document" %}
           -- One unit per document, with no list to unnest.
           document_unit(doc['text'], {{ prepare.min_chars }}, {{ prepare.max_chars }}) AS unit
{%- else %}
           unnest(candidate_units(doc['text'], '{{ prepare.mode }}', {{ prepare.min_chars }},
                                  {{ prepare.max_chars }}, {{ prepare.repeat_jaccard }})) AS unit
{%- endif %}
    FROM cleaned
),
checked AS (
    SELECT *,
           CASE WHEN unit['drop'] IS NULL THEN quality_problem(unit['text'], metadata) END
               AS quality_drop
    FROM units
),
measured AS (
    SELECT doc_id, source, file, line, boilerplate_lines,
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
)
SELECT concat(doc_id, '#', CAST(ordinal AS VARCHAR)) AS id,
       doc_id,
       ordinal,
       header,
       text,
       CAST(character_length(text) AS BIGINT) AS n_chars,
       n_tokens,
       source,
       file,
       line,
       boilerplate_lines,
       dedup_key,
{%- if prepare.near_dedup %}
       CASE WHEN rule_drop IS NULL THEN minhash(text) END AS minhash,
{%- endif %}
       rule_drop AS _drop
FROM ruled
