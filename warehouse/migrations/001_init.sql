-- 001: the whole pipeline's hand-off tables. One DuckDB file per data home.
CREATE SEQUENCE IF NOT EXISTS id_seq START 1;

CREATE TABLE runs (
    run_id        VARCHAR PRIMARY KEY,
    profile       VARCHAR NOT NULL,
    command       VARCHAR NOT NULL,          -- "run", "stage generate", ...
    status        VARCHAR NOT NULL,          -- running | success | failed
    started_at    TIMESTAMP NOT NULL,
    finished_at   TIMESTAMP,
    flow_run_id   VARCHAR                    -- Prefect flow run, for the dashboard link
);

CREATE TABLE stage_runs (
    stage_run_id  VARCHAR PRIMARY KEY,
    run_id        VARCHAR NOT NULL,
    stage         VARCHAR NOT NULL,
    status        VARCHAR NOT NULL,          -- running | success | failed | skipped
    config_hash   VARCHAR,
    input_hash    VARCHAR,
    inputs        JSON,                      -- the components of input_hash, to explain staleness
    output_hash   VARCHAR,                   -- what downstream stages hash as their input
    metrics       JSON,
    error         VARCHAR,
    started_at    TIMESTAMP NOT NULL,
    finished_at   TIMESTAMP,
    seconds       DOUBLE
);

CREATE TABLE seed_tasks (
    seed_id           VARCHAR PRIMARY KEY,
    name              VARCHAR,
    instruction       VARCHAR NOT NULL,
    is_classification BOOLEAN NOT NULL,
    source            VARCHAR,
    instances         JSON NOT NULL,          -- [{"input","output"}]
    loaded_at         TIMESTAMP NOT NULL
);

CREATE TABLE teacher_requests (
    request_key       VARCHAR PRIMARY KEY,    -- deterministic per unit of work: rerun never resends a stored key
    stage             VARCHAR NOT NULL,
    purpose           VARCHAR NOT NULL,       -- instructions | classify | instances | judge
    prompt_hash       VARCHAR NOT NULL,
    model             VARCHAR NOT NULL,
    params            JSON,
    prompt            VARCHAR,
    texts             JSON,                   -- list of choice texts
    finish_reason     VARCHAR,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_s         DOUBLE,
    attempts          INTEGER,
    error             VARCHAR,
    cost_usd          DOUBLE,
    created_at        TIMESTAMP NOT NULL
);

CREATE TABLE candidates (
    candidate_id      BIGINT PRIMARY KEY,
    request_key       VARCHAR NOT NULL,
    position          INTEGER NOT NULL,       -- index of the item in the parsed response
    instruction       VARCHAR NOT NULL,
    input             VARCHAR,                -- alpaca recipe: generated with the instruction
    output            VARCHAR,
    heuristic_reason  VARCHAR,                -- NULL = passed the heuristic filters
    verdict           VARCHAR,                -- kept | rejected (NULL until filtered)
    reason            VARCHAR,                -- heuristic reason, near_duplicate, or NULL when kept
    max_score         DOUBLE,
    most_similar      VARCHAR,                -- "seed:<id>" or "cand:<id>"
    top_k             JSON,                   -- [[id, score], ...] best first
    mean_score        DOUBLE,
    is_classification BOOLEAN,
    created_at        TIMESTAMP NOT NULL,
    UNIQUE (request_key, position)
);

CREATE TABLE instances (
    candidate_id  BIGINT NOT NULL,
    idx           INTEGER NOT NULL,
    input         VARCHAR NOT NULL,
    output        VARCHAR NOT NULL,
    PRIMARY KEY (candidate_id, idx)
);

CREATE VIEW kept_instructions AS
    SELECT * FROM candidates WHERE verdict = 'kept';

CREATE TABLE sft_examples (
    dataset_hash  VARCHAR NOT NULL,
    split         VARCHAR NOT NULL,           -- train | eval
    instruction   VARCHAR NOT NULL,
    input         VARCHAR NOT NULL,
    output        VARCHAR NOT NULL,
    source        VARCHAR NOT NULL            -- seed | generated
);

CREATE TABLE responses (
    response_id   BIGINT PRIMARY KEY,
    stage         VARCHAR NOT NULL,           -- preferences | evaluate
    model_path    VARCHAR NOT NULL,
    prompt        VARCHAR NOT NULL,
    sample_idx    INTEGER NOT NULL,
    response      VARCHAR NOT NULL,
    created_at    TIMESTAMP NOT NULL
);

CREATE TABLE preference_pairs (
    pair_id       BIGINT PRIMARY KEY,
    source        VARCHAR NOT NULL,           -- judged | imported
    prompt        VARCHAR NOT NULL,
    response_a    VARCHAR NOT NULL,
    response_b    VARCHAR NOT NULL,
    verdict_ab    VARCHAR,                    -- judge asked (a, b)
    verdict_ba    VARCHAR,                    -- judge asked (b, a), mapped back to a/b
    outcome       VARCHAR NOT NULL,           -- a | b | tie | disagree | invalid
    chosen        VARCHAR,
    rejected      VARCHAR,
    judge_model   VARCHAR,
    judge_text_ab VARCHAR,
    judge_text_ba VARCHAR,
    origin        VARCHAR,                    -- imported: "file:line"
    created_at    TIMESTAMP NOT NULL
);

CREATE TABLE checkpoints (
    checkpoint_id BIGINT PRIMARY KEY,
    stage_run_id  VARCHAR,
    kind          VARCHAR NOT NULL,           -- sft | reward | ppo_policy | ppo_value
    path          VARCHAR NOT NULL,
    base          VARCHAR,
    dataset_hash  VARCHAR,
    config        JSON,
    metrics       JSON,
    created_at    TIMESTAMP NOT NULL
);

CREATE TABLE step_metrics (
    stage_run_id  VARCHAR NOT NULL,
    stage         VARCHAR NOT NULL,
    step          INTEGER NOT NULL,
    name          VARCHAR NOT NULL,
    value         DOUBLE,
    created_at    TIMESTAMP NOT NULL
);

CREATE TABLE eval_results (
    stage_run_id  VARCHAR NOT NULL,
    prompt        VARCHAR NOT NULL,
    sft_response  VARCHAR,
    ppo_response  VARCHAR,
    rm_score_sft  DOUBLE,
    rm_score_ppo  DOUBLE,
    kl_ppo        DOUBLE,
    judge_outcome VARCHAR,                    -- ppo | sft | tie | disagree | invalid | NULL
    created_at    TIMESTAMP NOT NULL
);
