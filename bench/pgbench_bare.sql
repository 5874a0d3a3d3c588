\set id :client_id + 2000000
SELECT pg_advisory_lock(:id);
SELECT pg_advisory_unlock(:id);
