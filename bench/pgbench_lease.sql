\set id :client_id + 1000000
WITH ins AS (
    INSERT INTO dlock_leases AS l (key, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms, pid, host)
    VALUES ('pgbench-' || (:id)::text, 'owner-' || (:id)::text, nextval('dlock_fence_seq'), clock_timestamp() + (30000::float8 * interval '1 millisecond'), clock_timestamp(), clock_timestamp(), 30000, 1, 'bench')
    ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, fence = nextval('dlock_fence_seq'),
        expires_at = clock_timestamp() + (30000::float8 * interval '1 millisecond'), acquired_at = clock_timestamp(),
        renewed_at = clock_timestamp(), ttl_ms = excluded.ttl_ms, pid = excluded.pid, host = excluded.host
    WHERE l.expires_at <= clock_timestamp()
    RETURNING fence)
SELECT (SELECT fence FROM ins),
       (SELECT (extract(epoch FROM (expires_at - clock_timestamp())) * 1000)::bigint FROM dlock_leases WHERE key = 'pgbench-' || (:id)::text);
WITH d AS (UPDATE dlock_leases SET expires_at = least(expires_at, statement_timestamp()) WHERE key = 'pgbench-' || (:id)::text AND owner = 'owner-' || (:id)::text RETURNING expires_at = statement_timestamp() AS live)
SELECT live, pg_notify('dlock' || chr(58) || 'dlock_leases', 'pgbench-' || (:id)::text)::text FROM d;
