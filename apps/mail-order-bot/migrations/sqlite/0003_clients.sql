-- The client directory, for deployments that keep it in the database
-- (`clients_from_store = true`). Lists are separated by ';'; attachments NULL means every kind.
CREATE TABLE clients (
    id          TEXT   PRIMARY KEY,
    name        TEXT   NOT NULL,
    addresses   TEXT   NOT NULL DEFAULT '',
    domains     TEXT   NOT NULL DEFAULT '',
    attachments TEXT,
    read_body   BIGINT NOT NULL DEFAULT 1
);
