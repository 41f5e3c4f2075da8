-- 006: preference files imported, by content. One row per import of a file: its SHA-256 (of the
-- bytes, streamed), what it held and what it added. A listed file whose hash has a `done` row here
-- is not read again (unless that import refused pairs as too long and the limit has been raised
-- since); a changed file is a new hash, so it is read again and adds only the pair keys not stored yet.
-- A file is stored in chunks, each its own transaction, its pairs tagged with the import's id: the row
-- is `importing` until the last chunk commits with it marked `done`. A bad line deletes the import's
-- pairs and row; a killed import leaves its row `importing`, and the next writer deletes the same.
ALTER TABLE preference_pairs ADD COLUMN import_id VARCHAR;   -- imported pairs: the import that stored them

CREATE TABLE imported_files (
    import_id         VARCHAR NOT NULL,
    sha256            VARCHAR NOT NULL,
    path              VARCHAR NOT NULL,      -- as configured, resolved (bundled:NAME -> the shipped file)
    status            VARCHAR NOT NULL,      -- importing | done
    bytes             BIGINT,
    pairs             BIGINT,                -- valid pairs within the limit (repeats of stored keys included)
    imported          BIGINT,                -- of which new pair keys: the rows this import added
    refused_too_long  BIGINT,                -- valid pairs with a field over max_field_chars, not stored
    max_field_chars   BIGINT NOT NULL,       -- the limit this import applied
    started_at        TIMESTAMP NOT NULL,
    finished_at       TIMESTAMP
);
