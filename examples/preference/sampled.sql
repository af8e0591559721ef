-- sampled: several rewrites of each kept pair, `rewrite_k` being `rewrite` with `n` samples:
-- `rewrites` is a list with one call struct per sample.
SELECT id, doc_id, instruction, text, score, rewrite_k(instruction, text) AS rewrites
FROM {{ stage.from }}
