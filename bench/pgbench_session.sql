\set id :client_id + 1000000
WITH l AS (SELECT pg_advisory_lock(:id))
INSERT INTO dlock_sessions AS h (key, lock_id, owner, fence, backend_pid, acquired_at, renewed_at, ttl_ms, pid, host)
SELECT 'pgbench-' || (:id)::text, :id, md5(random()::text), nextval('dlock_fence_seq'), pg_backend_pid(), clock_timestamp(), clock_timestamp(), 30000, 1, 'bench' FROM l
ON CONFLICT (key) DO UPDATE SET lock_id = excluded.lock_id, owner = excluded.owner, fence = excluded.fence,
    backend_pid = excluded.backend_pid, acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at,
    ttl_ms = excluded.ttl_ms, pid = excluded.pid, host = excluded.host
RETURNING fence;
WITH d AS (DELETE FROM dlock_sessions WHERE key = 'pgbench-' || (:id)::text AND backend_pid = pg_backend_pid() RETURNING 1)
SELECT pg_advisory_unlock(:id), (SELECT count(*) FROM d);
