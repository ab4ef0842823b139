-- `call_rollups_settle()` (0028) in PL/pgSQL instead of SQL. The call
-- rollups' statement triggers read it on every statement that writes
-- calls (an intent insert, a final upsert: three times per job when a
-- batch holds one). A SQL function whose body has a FROM clause is never
-- inlined, and Postgres parses and plans its query again in every
-- transaction (about 25 us here); PL/pgSQL keeps the plan for the session.
-- Same value, same volatility: a lowered `settle` is seen by the next
-- statement, as before.
CREATE OR REPLACE FUNCTION call_rollups_settle() RETURNS INTERVAL
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT settle FROM call_rollup_state);
END
$$;
