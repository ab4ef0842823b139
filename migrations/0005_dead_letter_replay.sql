-- A dead letter is replayed at most once: `replayed_at` is set in the same
-- statement that claims it.
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS replayed_at TIMESTAMPTZ;
