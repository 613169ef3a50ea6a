-- Identity (see the PostgreSQL migration of the same name).
--
-- STRICT tables, so a value of the wrong type (a UUID bound as a blob, say) is an
-- error instead of being stored as whatever it happens to be.
-- UUIDs are hyphenated TEXT so the file reads well in the sqlite3 CLI.
-- Timestamps are TEXT in one fixed-width UTC shape, 2024-01-02T03:04:05.123456Z,
-- which the store writes explicitly: fixed width makes text order time order. The
-- defaults (for hand-written inserts) produce the same shape.

CREATE TABLE users (
    id                  TEXT    NOT NULL PRIMARY KEY,
    username            TEXT    NOT NULL,
    email               TEXT,
    password_hash       TEXT    NOT NULL,
    disabled            INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    created_at          TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')),
    updated_at          TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')),
    password_changed_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'))
) STRICT;
-- lower() folds ASCII only in SQLite; good enough for the embedded mode.
CREATE UNIQUE INDEX users_username_key ON users (lower(username));
CREATE UNIQUE INDEX users_email_key ON users (lower(email)) WHERE email IS NOT NULL;

CREATE TABLE roles (
    name        TEXT NOT NULL PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'))
) STRICT;

CREATE TABLE role_permissions (
    role_name  TEXT NOT NULL REFERENCES roles (name) ON DELETE CASCADE,
    permission TEXT NOT NULL,
    PRIMARY KEY (role_name, permission)
) STRICT;

CREATE TABLE user_roles (
    user_id   TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role_name TEXT NOT NULL REFERENCES roles (name) ON DELETE CASCADE,
    PRIMARY KEY (user_id, role_name)
) STRICT;
CREATE INDEX user_roles_role_name_idx ON user_roles (role_name);

-- No foreign key to users: the record of what happened to a user must outlive
-- the user.
CREATE TABLE audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')),
    kind        TEXT    NOT NULL,
    user_id     TEXT,
    username    TEXT,
    client_ip   TEXT,
    outcome     TEXT    NOT NULL,
    detail      TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(detail))
) STRICT;
CREATE INDEX audit_events_occurred_at_idx ON audit_events (occurred_at);

CREATE TABLE signing_keys (
    kid                   TEXT NOT NULL PRIMARY KEY,
    algorithm             TEXT NOT NULL,
    public_key            BLOB NOT NULL,
    private_key_encrypted BLOB NOT NULL,
    created_at            TEXT NOT NULL,
    activates_at          TEXT NOT NULL
) STRICT;
