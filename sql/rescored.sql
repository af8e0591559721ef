-- rescored: iteration 1 of self-curation (Humpback's M1). A second model, fine-tuned on the
-- seed plus the pairs iteration 0 kept, rates the same pairs again through `rescore`
-- ([functions.rescore], model role `scorer_m1` unless set). Every column of `scored` stays,
-- so both iterations sit side by side: `score` is M0's, `score_1` M1's, and the `_1` columns
-- mean what their `scored` namesakes mean. `[curate] iteration = 1` curates on `score_1`.
WITH judged AS (
    SELECT *, rescore(instruction, text) AS judgement_1
    FROM {{ stage.from }}
),
read AS (
    SELECT *,
           judge_score(judgement_1['text'], judgement_1['finish_reason'],
                       judgement_1['error'], judgement_1['top_logprobs']) AS j
    FROM judged
)
SELECT * EXCLUDE (j),
       j['score'] AS score_1,
       j['reason'] AS score_reason_1,
       j['expected'] AS score_expected_1,
       j['mass'] AS score_mass_1,
       j['source'] AS score_source_1,
       {{ functions.rescore.model | sql_string }} AS score_model_1
FROM read
