-- 004: Batch API mode (teacher.mode = "batch"). One row per batch input we uploaded, and one per
-- request key it holds. The input file id is the local key: it is recorded before the batch is
-- created, so a run killed between the two finds its batch on the server instead of paying twice.
CREATE TABLE teacher_batches (
    input_file_id  VARCHAR PRIMARY KEY,
    batch_id       VARCHAR,                -- NULL until the endpoint created the batch
    stage          VARCHAR NOT NULL,
    endpoint       VARCHAR NOT NULL,       -- the base URL (never the key)
    status         VARCHAR NOT NULL,       -- uploaded | the API's: validating, in_progress, finalizing,
                                           -- completed, failed, expired, cancelling, cancelled
    requests       INTEGER NOT NULL,
    completed      INTEGER,
    failed         INTEGER,
    output_file_id VARCHAR,
    error_file_id  VARCHAR,
    error          VARCHAR,                -- why the batch as a whole ended without its lines
    created_at     TIMESTAMP NOT NULL,
    finished_at    TIMESTAMP,
    collected_at   TIMESTAMP               -- its lines are downloaded into teacher_batch_requests
);

CREATE TABLE teacher_batch_requests (
    input_file_id  VARCHAR NOT NULL,
    request_key    VARCHAR NOT NULL,
    purpose        VARCHAR NOT NULL,       -- instructions | classify | instances
    prompt         VARCHAR NOT NULL,
    params         JSON,
    meta           JSON,                   -- what handling the answer needs (n_demos, candidate id, ...)
    response       JSON,                   -- the answer's body (a chat completion), once collected
    error          VARCHAR,                -- the line's error, or why its batch ended without running it
    missing        BOOLEAN,                -- the batch ended (expired, cancelled, failed) before this line ran
    PRIMARY KEY (input_file_id, request_key)
);
