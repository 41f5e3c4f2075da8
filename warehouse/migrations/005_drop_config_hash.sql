-- 005: stage_runs.config_hash was written and never read: the config hash is inputs["config"],
-- which `status` compares (and input_hash covers). One record of it, not two.
ALTER TABLE stage_runs DROP COLUMN config_hash;
