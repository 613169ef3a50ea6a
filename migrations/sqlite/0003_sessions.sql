-- Sessions, refresh-token state and failed-login counters for the embedded mode:
-- the Redis layout of src/sessions/redis.rs as tables (see src/sessions/sqlite.rs).
--
-- Times are INTEGER Unix milliseconds, the clock the session code passes in.
-- Redis forgets expired keys by itself; here a row past its expiry is treated as
-- absent by every query and deleted lazily (and swept on writes, through the
-- expiry indexes, so abandoned rows do not pile up).
-- Lists (roles, permissions, refresh-token hashes) are JSON arrays of strings.

-- No foreign key to users: sessions are revoked explicitly when a user is deleted
-- or disabled, as in Redis mode, and the table does not depend on the identity
-- schema.
CREATE TABLE sessions (
    id              TEXT    NOT NULL PRIMARY KEY,
    user_id         TEXT    NOT NULL,
    username        TEXT    NOT NULL,
    roles           TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(roles)),
    permissions     TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(permissions)),
    created_at      INTEGER NOT NULL,
    last_used_at    INTEGER NOT NULL,
    -- The absolute end of the session.
    expires_at      INTEGER NOT NULL,
    -- When the session idles out: min(last touch + idle timeout, expires_at). The
    -- CHECK keeps "idle_expires_at > now" sufficient for "alive".
    idle_expires_at INTEGER NOT NULL CHECK (idle_expires_at <= expires_at),
    client_ip       TEXT,
    user_agent      TEXT,
    -- Refresh rotations so far.
    generation      INTEGER NOT NULL DEFAULT 0 CHECK (generation >= 0),
    -- Hashes of the refresh tokens accepted now (more than one after a grace reuse).
    current_hashes  TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(current_hashes)),
    -- The hashes that were current before the last rotation (for the reuse grace).
    previous_hashes TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(previous_hashes)),
    -- When the last rotation happened; NULL before the first.
    rotated_at      INTEGER,
    -- The last few hashes used up, for reuse detection.
    used_hashes     TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(used_hashes))
) STRICT;
CREATE INDEX sessions_user_id_idx ON sessions (user_id);
CREATE INDEX sessions_idle_expires_at_idx ON sessions (idle_expires_at);

-- Failed logins per username, lower-cased by the store (Unicode-aware, unlike
-- SQLite's lower()).
CREATE TABLE login_failures (
    username     TEXT    NOT NULL PRIMARY KEY,
    failures     INTEGER NOT NULL CHECK (failures > 0),
    -- End of the current lockout (0: none yet).
    locked_until INTEGER NOT NULL DEFAULT 0,
    -- When the count lapses: the window (plus the lockout) after the last failure.
    expires_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX login_failures_expires_at_idx ON login_failures (expires_at);

-- Failed logins per client IP in a fixed 60 s window from the first failure.
CREATE TABLE ip_login_failures (
    client_ip  TEXT    NOT NULL PRIMARY KEY,
    failures   INTEGER NOT NULL CHECK (failures > 0),
    expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX ip_login_failures_expires_at_idx ON ip_login_failures (expires_at);
