-- A read-only role for analysts: it can read jobs, calls (the cost records),
-- steps and results, and nothing else: no writes, no dead letters (raw,
-- possibly sensitive payloads), no migration bookkeeping. Switchyard stores
-- no API keys anywhere. Give people a login role that is a member:
--   CREATE ROLE alice LOGIN IN ROLE switchyard_analyst;
--
-- Roles are cluster-wide while migrations run per database, possibly several
-- at once: creating the role tolerates another migration creating it first,
-- and a database user without CREATEROLE skips it with a notice.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        BEGIN
            CREATE ROLE switchyard_analyst NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL; -- created by a concurrent migration
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'role switchyard_analyst not created: %', SQLERRM;
        END;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT USAGE ON SCHEMA public TO switchyard_analyst;
        GRANT SELECT ON jobs, calls, steps, results TO switchyard_analyst;
    END IF;
END
$$;
