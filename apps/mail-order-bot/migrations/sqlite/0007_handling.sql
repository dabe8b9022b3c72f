-- Messages being read now, by task, and how often reading each began: a message whose
-- reading stopped the process (an abort, an out-of-memory kill) is recognised when it
-- comes again, and after `max_handling_deaths` such deaths it is rejected unread instead
-- of crashing every start.
CREATE TABLE handling (
    task_id    TEXT PRIMARY KEY,
    starts     BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
