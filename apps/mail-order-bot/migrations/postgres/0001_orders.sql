-- Orders, their lines, and one outcome per message identity (the same schema as SQLite's).
-- The UNIQUE keys on message_identity are what makes "an order is never created twice" true:
-- two workers racing on the same message produce one order; the loser sees a duplicate.

CREATE TABLE orders (
    id               BIGSERIAL PRIMARY KEY,
    message_identity TEXT      NOT NULL UNIQUE,
    client_id        TEXT      NOT NULL,
    client_name      TEXT      NOT NULL,
    sender           TEXT      NOT NULL,
    subject          TEXT,
    created_at       TEXT      NOT NULL
);

CREATE TABLE order_lines (
    order_id  BIGINT  NOT NULL REFERENCES orders (id),
    line_no   BIGINT  NOT NULL,
    sku       TEXT    NOT NULL,
    quantity  BIGINT  NOT NULL CHECK (quantity > 0),
    origin    TEXT    NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

CREATE TABLE message_outcomes (
    message_identity    TEXT    PRIMARY KEY,
    outcome             TEXT    NOT NULL,
    reason              TEXT,
    order_id            BIGINT  REFERENCES orders (id),
    content_sha256      TEXT    NOT NULL,
    sender              TEXT,
    subject             TEXT,
    task_id             TEXT    NOT NULL,
    deliveries          BIGINT  NOT NULL DEFAULT 1,
    recorded_at         TEXT    NOT NULL,
    updated_at          TEXT    NOT NULL,
    content_fingerprint TEXT
);

CREATE INDEX message_outcomes_by_outcome ON message_outcomes (outcome);
