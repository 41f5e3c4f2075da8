-- 007: evaluate compares every aligned policy (ppo, dpo, grpo) with SFT, so its rows are one per
-- (prompt, policy) instead of eval_results' fixed sft/ppo columns. The old rows move over: each old
-- row becomes an sft row and a ppo row of the same prompt (judge outcome from PPO's side).
CREATE TABLE eval_replies (
    stage_run_id     VARCHAR NOT NULL,
    prompt_index     INTEGER NOT NULL,          -- position in the evaluated prompt set
    prompt           VARCHAR NOT NULL,          -- as the policy saw it (SFT format)
    policy           VARCHAR NOT NULL,          -- sft | ppo | dpo | grpo
    reply            VARCHAR,
    ended            BOOLEAN,                   -- eos within evaluate.max_new_tokens
    words            INTEGER,
    repetition       DOUBLE,                    -- share of word 3-grams repeating an earlier one
    rm_score         DOUBLE,
    rm_holdout_score DOUBLE,
    kl_to_sft        DOUBLE,                    -- NULL for sft
    judge_outcome    VARCHAR,                   -- vs SFT, from the policy's side: win | loss | tie | disagree | invalid
    created_at       TIMESTAMP NOT NULL
);
INSERT INTO eval_replies
SELECT stage_run_id, CAST(row_number() OVER (PARTITION BY stage_run_id ORDER BY rowid) - 1 AS INTEGER), prompt, 'sft',
       sft_response, NULL, NULL, NULL, rm_score_sft, NULL, NULL, NULL, created_at
FROM eval_results;
INSERT INTO eval_replies
SELECT stage_run_id, CAST(row_number() OVER (PARTITION BY stage_run_id ORDER BY rowid) - 1 AS INTEGER), prompt, 'ppo',
       ppo_response, NULL, NULL, NULL, rm_score_ppo, NULL, kl_ppo,
       CASE judge_outcome WHEN 'ppo' THEN 'win' WHEN 'sft' THEN 'loss' ELSE judge_outcome END, created_at
FROM eval_results;
DROP TABLE eval_results;
