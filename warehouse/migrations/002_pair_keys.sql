-- 002: judged and imported pairs get a content key, so a rerun or re-import never duplicates a pair.
ALTER TABLE preference_pairs ADD COLUMN pair_key VARCHAR;
CREATE UNIQUE INDEX preference_pairs_key ON preference_pairs (pair_key);
ALTER TABLE responses ADD COLUMN response_key VARCHAR;
CREATE UNIQUE INDEX responses_key ON responses (response_key);
