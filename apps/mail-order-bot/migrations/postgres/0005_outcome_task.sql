-- The task that carried each message (its source, kind and pointer, as JSON), so that an
-- operator can run the mail of an outcome again (`outcomes replay`).
ALTER TABLE message_outcomes ADD COLUMN task TEXT;
