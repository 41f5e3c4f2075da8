-- 003: a stored failure is history, not a result. When a rerun retries a failed key, the failed row
-- moves here (same columns, plus when it was replaced) and the new attempt takes its place in
-- teacher_requests; a key's attempt count is 1 + its rows here.
CREATE TABLE teacher_request_history AS SELECT *, created_at AS replaced_at FROM teacher_requests LIMIT 0;
