-- Providers cap what may wait in their batch queues: OpenAI the prompt
-- tokens enqueued per model, Anthropic the requests queued. A batch's
-- estimated prompt tokens are kept so a worker submits only what fits
-- beside the batches already with the provider.
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS tokens BIGINT NOT NULL DEFAULT 0;
