-- The 2026-11 security review (see src/sessions/sqlite.rs and src/store/sqlite.rs):
-- authorization versions that end stale tokens at once, the password epoch a
-- session began under, lockout counters by account, and the per-IP slow lane.

-- Raised by every change of a user's roles, a role's permissions, the disabled
-- flag or the password; tokens carry the version they were minted under.
ALTER TABLE users ADD COLUMN authz_version INTEGER NOT NULL DEFAULT 0 CHECK (authz_version >= 0);

ALTER TABLE sessions ADD COLUMN authz_version INTEGER NOT NULL DEFAULT 0 CHECK (authz_version >= 0);
-- users.password_changed_at (Unix microseconds) when the session began; NULL for
-- sessions of earlier releases (judged by created_at).
ALTER TABLE sessions ADD COLUMN password_epoch INTEGER;

-- The session store's copy of each user's authorization version, read with the
-- session on every check; kept a day past its last change, like the Redis key.
CREATE TABLE authz_versions (
    user_id    TEXT    NOT NULL PRIMARY KEY,
    version    INTEGER NOT NULL CHECK (version >= 0),
    expires_at INTEGER NOT NULL
) STRICT;

-- Failed logins were counted per lower-cased username; now per subject: the
-- account (`id:<uuid>`) or, for a name that matches none, `name:<name>`. Old
-- counters cannot be mapped and are dropped (at most one window's failures).
DELETE FROM login_failures;
ALTER TABLE login_failures RENAME COLUMN username TO subject;

-- The next free turn of the IP's slow lane (Unix ms; 0: none taken).
ALTER TABLE ip_login_failures ADD COLUMN slow_until INTEGER NOT NULL DEFAULT 0;

-- GET /v1/admin/audit filters by user and kind, newest first (by id).
CREATE INDEX audit_events_user_id_idx ON audit_events (user_id, id);
CREATE INDEX audit_events_kind_idx ON audit_events (kind, id);
