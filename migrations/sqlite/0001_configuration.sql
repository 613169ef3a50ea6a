-- Runtime configuration (see the PostgreSQL migration of the same name).
CREATE TABLE configuration (
    key           TEXT    PRIMARY KEY,
    value         TEXT    NOT NULL CHECK (json_valid(value)),
    last_modified TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
