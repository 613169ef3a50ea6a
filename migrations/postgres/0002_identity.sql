-- Identity: users, roles and their permissions, role assignments, the security
-- audit trail and the signing keys every replica shares.

CREATE TABLE users (
    id                  uuid        PRIMARY KEY,
    username            text        NOT NULL,
    email               text,
    -- PHC string (argon2id parameters, salt and hash together).
    password_hash       text        NOT NULL,
    disabled            boolean     NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    password_changed_at timestamptz NOT NULL DEFAULT now()
);
-- "Alice" and "alice" are the same user: uniqueness (and login lookup, and the
-- admin list's keyset order) go by the lower-cased name.
CREATE UNIQUE INDEX users_username_key ON users (lower(username));
CREATE UNIQUE INDEX users_email_key ON users (lower(email)) WHERE email IS NOT NULL;

CREATE TABLE roles (
    name        text        PRIMARY KEY,
    description text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE role_permissions (
    role_name  text NOT NULL REFERENCES roles (name) ON DELETE CASCADE,
    permission text NOT NULL,
    PRIMARY KEY (role_name, permission)
);

CREATE TABLE user_roles (
    user_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role_name text NOT NULL REFERENCES roles (name) ON DELETE CASCADE,
    PRIMARY KEY (user_id, role_name)
);
-- The primary key serves lookups by user; deleting a role cascades by role name.
CREATE INDEX user_roles_role_name_idx ON user_roles (role_name);

-- No foreign key to users: the record of what happened to a user must outlive
-- the user.
CREATE TABLE audit_events (
    id          bigserial   PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    kind        text        NOT NULL,
    user_id     uuid,
    username    text,
    client_ip   text,
    outcome     text        NOT NULL,
    detail      jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_occurred_at_idx ON audit_events (occurred_at);

CREATE TABLE signing_keys (
    kid                   text        PRIMARY KEY,
    algorithm             text        NOT NULL,
    public_key            bytea       NOT NULL,
    -- nonce || AES-256-GCM ciphertext under AUTH_KEY_ENCRYPTION_KEY.
    private_key_encrypted bytea       NOT NULL,
    created_at            timestamptz NOT NULL,
    activates_at          timestamptz NOT NULL
);
