-- Replies to senders (`reply:<outcome>` rows of the outbox): whom the reply goes to, what
-- it answers (JSON: In-Reply-To and References of the message), and when it was handed to
-- the SMTP relay (the per-sender rate limit counts these). A rejection and, after a replay,
-- the confirmation of the same message are two effects (`reply:unknown_client`,
-- `reply:created`), each once.
ALTER TABLE outbox ADD COLUMN recipient TEXT;
ALTER TABLE outbox ADD COLUMN payload TEXT;
ALTER TABLE outbox ADD COLUMN sent_ms BIGINT;
CREATE INDEX outbox_by_recipient ON outbox (recipient, sent_ms);
