-- The transactional outbox: the effects of a recorded outcome (`erp`: the order to the ERP,
-- `reply`: an email to the sender), written in the same transaction as the outcome, then
-- performed by the `outbox` worker pool. One row per effect and message: the UNIQUE key is
-- what makes "each effect once" true on the writing side; the ERP's idempotency key (the
-- order's identity) makes a repeat after a crash harmless on the other.
-- Times are milliseconds since the Unix epoch, from the database's clock.
CREATE TABLE outbox (
    id               BIGSERIAL PRIMARY KEY,
    effect           TEXT    NOT NULL,
    message_identity TEXT    NOT NULL,
    order_id         BIGINT  REFERENCES orders (id),
    -- pending | done | dead
    state            TEXT    NOT NULL DEFAULT 'pending',
    -- failed attempts so far, and their history (JSON, the latest ones)
    attempt          BIGINT  NOT NULL DEFAULT 0,
    history          TEXT    NOT NULL DEFAULT '[]',
    last_error       TEXT,
    due_ms           BIGINT  NOT NULL,
    -- the claim of the dispatcher working on it, until lease_until_ms
    claim            BIGINT,
    lease_until_ms   BIGINT,
    created_ms       BIGINT  NOT NULL,
    settled_ms       BIGINT,
    UNIQUE (effect, message_identity)
);

CREATE INDEX outbox_by_state ON outbox (state, due_ms);
