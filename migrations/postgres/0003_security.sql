-- The 2026-11 security review (see src/store/postgres.rs).

-- Raised in the same transaction as every change of a user's roles, a role's
-- permissions, the disabled flag or the password; access tokens carry the version
-- they were minted under, and validation refuses older ones.
ALTER TABLE users ADD COLUMN authz_version bigint NOT NULL DEFAULT 0;

-- Usernames are ASCII (the service refuses others) and fold with ASCII rules only,
-- whatever the database's locale: lower() under a UTF-8 locale folds 'İ' to 'i'
-- (so 'ADMİN' found 'admin'), and under a Turkish one folds 'I' to 'ı'. The
-- service looks names up by this expression. The index on lower(username) stays
-- until no replica of an earlier release queries it (drop it in a later release).
CREATE UNIQUE INDEX users_username_ascii_key ON users (lower(username COLLATE "C"));

-- GET /v1/admin/audit filters by user and kind, newest first (by id).
CREATE INDEX audit_events_user_id_idx ON audit_events (user_id, id);
CREATE INDEX audit_events_kind_idx ON audit_events (kind, id);
