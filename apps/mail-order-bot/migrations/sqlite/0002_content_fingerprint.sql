-- What a message says, hashed (sender, subject, decoded texts and attachments): two
-- deliveries of one message have the same fingerprint; a different message reusing a
-- Message-ID does not, and is kept apart as a conflicting duplicate.
ALTER TABLE message_outcomes ADD COLUMN content_fingerprint TEXT;
