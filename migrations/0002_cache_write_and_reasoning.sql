-- Providers that charge for cache writes (Anthropic) and report reasoning tokens.
-- input_tokens still counts all input, including cached reads and cache writes;
-- output_tokens still counts all output, including reasoning tokens.
ALTER TABLE calls ADD COLUMN IF NOT EXISTS cache_write_input_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS reasoning_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS price_cache_write_per_mtok NUMERIC NOT NULL DEFAULT 0;
