-- Structured outputs: a job that asked for JSON (`response_format`) keeps
-- its parsed answer, so analysts can query its fields:
--   SELECT output_json->>'sentiment', count(*) FROM results GROUP BY 1;
ALTER TABLE results ADD COLUMN IF NOT EXISTS output_json JSONB;
