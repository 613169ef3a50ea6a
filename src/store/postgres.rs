//! [`IdentityStore`] on PostgreSQL, the store every replica shares.
//!
//! Queries are built at runtime (`sqlx::query`, not `query!`) so that building the
//! service never needs a database. Every mutation runs in one transaction together
//! with its audit event. Where replicas could race (the first user, key rotation,
//! configuration versions), a transaction-scoped advisory lock serializes them;
//! the transactions run at READ COMMITTED, so each statement after the lock sees
//! whatever the previous holder committed.

use sqlx::{postgres::PgRow, PgConnection, PgPool, Row};
use uuid::Uuid;

use super::{
    database::{audit_for_new_user, conflict, distinct_sorted},
    IdentityStore, StoreError, StoredKey,
};
use crate::users::{
    AuditEvent, AuditQuery, AuthzVersion, Credentials, NewUser, Role, RoleUpdate, StoredAuditEvent,
    User, UserPage, UserUpdate, ADMIN_PERMISSION,
};

/// Advisory lock held while creating the first user.
const FIRST_USER_LOCK: i64 = 0x6175_7468_0000_0001;
/// Advisory lock held while adding a signing key.
const SIGNING_KEY_LOCK: i64 = 0x6175_7468_0000_0002;
/// Advisory lock held while changing configuration (see `set_configuration`).
const CONFIGURATION_LOCK: i64 = 0x6175_7468_0000_0003;
/// Advisory lock held by every change that could leave no administrator, so two
/// of them (two admins demoting each other) cannot each see the other remain.
const ADMINS_LOCK: i64 = 0x6175_7468_0000_0004;
/// Advisory lock of the replica pruning audit events (tried, never waited for).
const AUDIT_PRUNE_LOCK: i64 = 0x6175_7468_0000_0005;

/// The columns of a [`User`], roles and permissions included, for `FROM users u`:
/// one round trip and one snapshot per read, however many users it returns.
const USER_COLUMNS: &str = "u.id, u.username, u.email, u.disabled, u.created_at, \
    u.updated_at, u.password_changed_at, u.authz_version, \
    ARRAY(SELECT ur.role_name FROM user_roles ur WHERE ur.user_id = u.id) AS roles, \
    ARRAY(SELECT DISTINCT rp.permission FROM user_roles ur \
          JOIN role_permissions rp ON rp.role_name = ur.role_name \
          WHERE ur.user_id = u.id) AS permissions";

/// The columns of a [`Role`], for `FROM roles r`.
const ROLE_COLUMNS: &str = "r.name, r.description, \
    ARRAY(SELECT rp.permission FROM role_permissions rp WHERE rp.role_name = r.name) \
    AS permissions";

fn user_from_row(row: &PgRow) -> Result<User, StoreError> {
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        email: row.try_get("email")?,
        disabled: row.try_get("disabled")?,
        // Sorted here rather than in SQL, so both backends sort the same way
        // (bytewise) whatever the database's collation.
        roles: distinct_sorted(row.try_get("roles")?),
        permissions: distinct_sorted(row.try_get("permissions")?),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        password_changed_at: row.try_get("password_changed_at")?,
        authz_version: u64::try_from(row.try_get::<i64, _>("authz_version")?)
            .map_err(|_| StoreError::Corrupt("authz_version".into()))?,
    })
}

/// Enabled users whose roles grant the admin permission.
async fn count_admins(conn: &mut PgConnection) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(DISTINCT u.id) FROM users u \
         JOIN user_roles ur ON ur.user_id = u.id \
         JOIN role_permissions rp ON rp.role_name = ur.role_name \
         WHERE rp.permission = $1 AND NOT u.disabled",
    )
    .bind(ADMIN_PERMISSION)
    .fetch_one(conn)
    .await?)
}

/// Serializes changes that could remove the last administrator, and counts the
/// administrators before the change (see `refuse_no_admins_left`).
async fn lock_admins(conn: &mut PgConnection) -> Result<i64, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ADMINS_LOCK)
        .execute(&mut *conn)
        .await?;
    count_admins(conn).await
}

/// Fails the transaction with `LastAdmin` when it would take the service from
/// some administrators to none.
async fn refuse_no_admins_left(conn: &mut PgConnection, before: i64) -> Result<(), StoreError> {
    if before > 0 && count_admins(conn).await? == 0 {
        return Err(StoreError::LastAdmin);
    }
    Ok(())
}

/// Raises the authorization version of every user holding `role`; returns their
/// new versions.
async fn bump_role_holders(
    conn: &mut PgConnection,
    role: &str,
) -> Result<Vec<AuthzVersion>, StoreError> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "UPDATE users SET authz_version = authz_version + 1 \
         WHERE id IN (SELECT user_id FROM user_roles WHERE role_name = $1) \
         RETURNING id, authz_version",
    )
    .bind(role)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(user_id, version)| {
            Ok(AuthzVersion {
                user_id,
                version: u64::try_from(version)
                    .map_err(|_| StoreError::Corrupt("authz_version".into()))?,
            })
        })
        .collect()
}

fn role_from_row(row: &PgRow) -> Result<Role, StoreError> {
    Ok(Role {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        permissions: distinct_sorted(row.try_get("permissions")?),
    })
}

fn key_from_row(row: &PgRow) -> Result<StoredKey, StoreError> {
    Ok(StoredKey {
        kid: row.try_get("kid")?,
        algorithm: row.try_get("algorithm")?,
        public_key: row.try_get("public_key")?,
        private_key_encrypted: row.try_get("private_key_encrypted")?,
        created_at: row.try_get("created_at")?,
        activates_at: row.try_get("activates_at")?,
    })
}

async fn fetch_user(conn: &mut PgConnection, id: Uuid) -> Result<Option<User>, StoreError> {
    sqlx::query(&format!(
        "SELECT {USER_COLUMNS} FROM users u WHERE u.id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .map(|row| user_from_row(&row))
    .transpose()
}

async fn fetch_role(conn: &mut PgConnection, name: &str) -> Result<Option<Role>, StoreError> {
    sqlx::query(&format!(
        "SELECT {ROLE_COLUMNS} FROM roles r WHERE r.name = $1"
    ))
    .bind(name)
    .fetch_optional(conn)
    .await?
    .map(|row| role_from_row(&row))
    .transpose()
}

/// Fails with `Invalid` naming the first role that does not exist. `FOR KEY SHARE`
/// keeps the roles from being deleted before this transaction assigns them (which
/// would otherwise surface as a foreign-key error, a 500).
async fn check_roles_exist(conn: &mut PgConnection, roles: &[String]) -> Result<(), StoreError> {
    if roles.is_empty() {
        return Ok(());
    }
    let found: Vec<String> =
        sqlx::query_scalar("SELECT name FROM roles WHERE name = ANY($1) FOR KEY SHARE")
            .bind(roles)
            .fetch_all(&mut *conn)
            .await?;
    match distinct_sorted(roles.to_vec())
        .into_iter()
        .find(|r| !found.contains(r))
    {
        Some(missing) => Err(StoreError::Invalid {
            field: "roles",
            message: format!("unknown role: {missing}"),
        }),
        None => Ok(()),
    }
}

/// Replaces the user's roles; the roles must have been checked.
async fn set_user_roles(
    conn: &mut PgConnection,
    user_id: Uuid,
    roles: &[String],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM user_roles WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO user_roles (user_id, role_name) \
         SELECT DISTINCT $1, r FROM unnest($2::text[]) AS r",
    )
    .bind(user_id)
    .bind(roles)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Replaces the role's permissions.
async fn set_role_permissions(
    conn: &mut PgConnection,
    role: &str,
    permissions: &[String],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM role_permissions WHERE role_name = $1")
        .bind(role)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO role_permissions (role_name, permission) \
         SELECT DISTINCT $1, p FROM unnest($2::text[]) AS p",
    )
    .bind(role)
    .bind(permissions)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn insert_audit(conn: &mut PgConnection, event: &AuditEvent) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (kind, user_id, username, client_ip, outcome, detail) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(event.kind)
    .bind(event.user_id)
    .bind(event.username.as_deref())
    .bind(event.client_ip.as_deref())
    .bind(event.outcome)
    .bind(&event.detail)
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts the user with its roles and the audit event; returns the new user.
async fn insert_user(
    conn: &mut PgConnection,
    user: &NewUser,
    audit: &AuditEvent,
) -> Result<User, StoreError> {
    check_roles_exist(conn, &user.roles).await?;
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO users (id, username, email, password_hash) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(&user.username)
        .bind(user.email.as_deref())
        .bind(&user.password_hash)
        .execute(&mut *conn)
        .await
        .map_err(conflict)?;
    set_user_roles(conn, id, &user.roles).await?;
    insert_audit(conn, &audit_for_new_user(audit, id, &user.username)).await?;
    fetch_user(conn, id).await?.ok_or(StoreError::NotFound)
}

impl IdentityStore for PgPool {
    async fn create_user(&self, user: &NewUser, audit: &AuditEvent) -> Result<User, StoreError> {
        let mut tx = self.begin().await?;
        let created = insert_user(&mut tx, user, audit).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn get_user(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        fetch_user(&mut *self.acquire().await?, id).await
    }

    async fn find_credentials(&self, username: &str) -> Result<Option<Credentials>, StoreError> {
        // ASCII folding on both sides, whatever the database's locale (see the
        // migration 0003); served by the unique index on that expression.
        sqlx::query(&format!(
            "SELECT {USER_COLUMNS}, u.password_hash FROM users u \
             WHERE lower(u.username COLLATE \"C\") = lower($1::text COLLATE \"C\")"
        ))
        .bind(username)
        .fetch_optional(self)
        .await?
        .map(|row| {
            Ok(Credentials {
                user: user_from_row(&row)?,
                password_hash: row.try_get("password_hash")?,
            })
        })
        .transpose()
    }

    async fn list_users(
        &self,
        filter: Option<&str>,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<UserPage, StoreError> {
        // A limit of 0 would give an empty page that looks like the last one.
        let limit = limit.max(1) as usize;
        // strpos, not LIKE: the filter is a literal substring, so `%`, `_` and `\`
        // in it need no escaping. Keyset pagination on the indexed lower(username),
        // which is unique, so no row is skipped or repeated between pages; one row
        // more than asked tells whether there is a next page.
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users u \
             WHERE ($1::text IS NULL OR strpos(lower(u.username), lower($1)) > 0) \
               AND ($2::text IS NULL \
                    OR lower(u.username COLLATE \"C\") > lower($2::text COLLATE \"C\")) \
             ORDER BY lower(u.username COLLATE \"C\") \
             LIMIT $3"
        ))
        .bind(filter)
        .bind(cursor)
        .bind(limit as i64 + 1)
        .fetch_all(self)
        .await?;
        let has_more = rows.len() > limit;
        let users = rows
            .iter()
            .take(limit)
            .map(user_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if has_more {
            users.last().map(|u| u.username.clone())
        } else {
            None
        };
        Ok(UserPage { users, next_cursor })
    }

    async fn update_user(
        &self,
        id: Uuid,
        update: &UserUpdate,
        audit: &AuditEvent,
    ) -> Result<User, StoreError> {
        let mut tx = self.begin().await?;
        let may_remove_admin = update.roles.is_some() || update.disabled == Some(true);
        let admins = if may_remove_admin {
            Some(lock_admins(&mut tx).await?)
        } else {
            None
        };
        let before = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users u WHERE u.id = $1 FOR UPDATE OF u"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| user_from_row(&row))
        .transpose()?
        .ok_or(StoreError::NotFound)?;
        sqlx::query(
            "UPDATE users SET \
                 email = CASE WHEN $2 THEN $3 ELSE email END, \
                 disabled = COALESCE($4, disabled), \
                 password_hash = COALESCE($5, password_hash), \
                 password_changed_at = \
                     CASE WHEN $5::text IS NULL THEN password_changed_at ELSE now() END, \
                 updated_at = now() \
             WHERE id = $1",
        )
        .bind(id)
        .bind(update.email.is_some())
        .bind(update.email.clone().flatten())
        .bind(update.disabled)
        .bind(update.password_hash.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(conflict)?;
        if let Some(roles) = &update.roles {
            check_roles_exist(&mut tx, roles).await?;
            set_user_roles(&mut tx, id, roles).await?;
        }
        let mut user = fetch_user(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        if user.changes_authorization_of(&before) || update.password_hash.is_some() {
            let version: i64 = sqlx::query_scalar(
                "UPDATE users SET authz_version = authz_version + 1 WHERE id = $1 \
                 RETURNING authz_version",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            user.authz_version =
                u64::try_from(version).map_err(|_| StoreError::Corrupt("authz_version".into()))?;
        }
        if let Some(admins) = admins {
            refuse_no_admins_left(&mut tx, admins).await?;
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(user)
    }

    async fn delete_user(&self, id: Uuid, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let admins = lock_admins(&mut tx).await?;
        let deleted = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        refuse_no_admins_left(&mut tx, admins).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn replace_password_hash(
        &self,
        id: Uuid,
        expected: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        // Only over the hash the caller verified: a password changed since (a
        // reset landing while a login's rehash was computing) stays.
        let updated =
            sqlx::query("UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2")
                .bind(id)
                .bind(expected)
                .bind(password_hash)
                .execute(self)
                .await?;
        Ok(updated.rows_affected() == 1)
    }

    async fn create_first_user(
        &self,
        user: &NewUser,
        role: &Role,
        audit: &AuditEvent,
    ) -> Result<Option<User>, StoreError> {
        let mut tx = self.begin().await?;
        // Replicas starting at once queue here; each, once it holds the lock, sees
        // the users committed by the one before it (READ COMMITTED takes a new
        // snapshot per statement), so exactly one finds the table empty.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(FIRST_USER_LOCK)
            .execute(&mut *tx)
            .await?;
        let any_user: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users)")
            .fetch_one(&mut *tx)
            .await?;
        if any_user {
            return Ok(None);
        }
        sqlx::query(
            "INSERT INTO roles (name, description) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&role.name)
        .bind(&role.description)
        .execute(&mut *tx)
        .await?;
        // Adds the role's permissions even when the role already existed: the first
        // administrator must be able to administer. Nothing is removed.
        sqlx::query(
            "INSERT INTO role_permissions (role_name, permission) \
             SELECT DISTINCT $1, p FROM unnest($2::text[]) AS p \
             ON CONFLICT DO NOTHING",
        )
        .bind(&role.name)
        .bind(&role.permissions)
        .execute(&mut *tx)
        .await?;
        let mut first = user.clone();
        first.roles.push(role.name.clone());
        let created = insert_user(&mut tx, &first, audit).await?;
        tx.commit().await?;
        Ok(Some(created))
    }

    async fn count_users(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM users")
            .fetch_one(self)
            .await?)
    }

    async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        sqlx::query(&format!(
            "SELECT {ROLE_COLUMNS} FROM roles r ORDER BY r.name"
        ))
        .fetch_all(self)
        .await?
        .iter()
        .map(role_from_row)
        .collect()
    }

    async fn get_role(&self, name: &str) -> Result<Option<Role>, StoreError> {
        fetch_role(&mut *self.acquire().await?, name).await
    }

    async fn create_role(&self, role: &Role, audit: &AuditEvent) -> Result<Role, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO roles (name, description) VALUES ($1, $2)")
            .bind(&role.name)
            .bind(&role.description)
            .execute(&mut *tx)
            .await
            .map_err(conflict)?;
        set_role_permissions(&mut tx, &role.name, &role.permissions).await?;
        insert_audit(&mut tx, audit).await?;
        let created = fetch_role(&mut tx, &role.name)
            .await?
            .ok_or(StoreError::NotFound)?;
        tx.commit().await?;
        Ok(created)
    }

    async fn update_role(
        &self,
        name: &str,
        update: &RoleUpdate,
        audit: &AuditEvent,
    ) -> Result<(Role, Vec<AuthzVersion>), StoreError> {
        let mut tx = self.begin().await?;
        let admins = match update.permissions {
            Some(_) => Some(lock_admins(&mut tx).await?),
            None => None,
        };
        let before = sqlx::query(&format!(
            "SELECT {ROLE_COLUMNS} FROM roles r WHERE r.name = $1 FOR UPDATE OF r"
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| role_from_row(&row))
        .transpose()?
        .ok_or(StoreError::NotFound)?;
        sqlx::query("UPDATE roles SET description = COALESCE($2, description) WHERE name = $1")
            .bind(name)
            .bind(update.description.as_deref())
            .execute(&mut *tx)
            .await?;
        let mut bumped = Vec::new();
        if let Some(permissions) = &update.permissions {
            set_role_permissions(&mut tx, name, permissions).await?;
            if distinct_sorted(permissions.clone()) != before.permissions {
                bumped = bump_role_holders(&mut tx, name).await?;
            }
        }
        if let Some(admins) = admins {
            refuse_no_admins_left(&mut tx, admins).await?;
        }
        insert_audit(&mut tx, audit).await?;
        let role = fetch_role(&mut tx, name)
            .await?
            .ok_or(StoreError::NotFound)?;
        tx.commit().await?;
        Ok((role, bumped))
    }

    async fn delete_role(
        &self,
        name: &str,
        audit: &AuditEvent,
    ) -> Result<Vec<AuthzVersion>, StoreError> {
        let mut tx = self.begin().await?;
        let admins = lock_admins(&mut tx).await?;
        let bumped = bump_role_holders(&mut tx, name).await?;
        // Cascades to its permissions and to its assignments.
        let deleted = sqlx::query("DELETE FROM roles WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        refuse_no_admins_left(&mut tx, admins).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(bumped)
    }

    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        insert_audit(&mut *self.acquire().await?, event).await
    }

    async fn audit_events(&self, q: &AuditQuery) -> Result<Vec<StoredAuditEvent>, StoreError> {
        sqlx::query(
            "SELECT id, occurred_at, kind, user_id, username, client_ip, outcome, detail \
             FROM audit_events \
             WHERE ($1::uuid IS NULL OR user_id = $1) \
               AND ($2::text IS NULL OR kind = $2) \
               AND ($3::text IS NULL OR outcome = $3) \
               AND ($4::timestamptz IS NULL OR occurred_at >= $4) \
               AND ($5::timestamptz IS NULL OR occurred_at < $5) \
               AND ($6::bigint IS NULL OR id < $6) \
             ORDER BY id DESC LIMIT $7",
        )
        .bind(q.user_id)
        .bind(q.kind.as_deref())
        .bind(q.outcome.as_deref())
        .bind(q.since)
        .bind(q.until)
        .bind(q.before_id)
        .bind(i64::from(q.limit))
        .fetch_all(self)
        .await?
        .iter()
        .map(|row| {
            Ok(StoredAuditEvent {
                id: row.try_get("id")?,
                occurred_at: row.try_get("occurred_at")?,
                kind: row.try_get("kind")?,
                user_id: row.try_get("user_id")?,
                username: row.try_get("username")?,
                client_ip: row.try_get("client_ip")?,
                outcome: row.try_get("outcome")?,
                detail: row.try_get("detail")?,
            })
        })
        .collect()
    }

    async fn prune_audit(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        batch: u32,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.begin().await?;
        // One replica at a time; the others find the lock taken and leave it.
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(AUDIT_PRUNE_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(None);
        }
        // Oldest first, through the primary key, a batch per transaction: a
        // backlog never holds a long lock on the table the logins write to.
        let deleted = sqlx::query(
            "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events \
             WHERE occurred_at < $1 ORDER BY id LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(batch))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(Some(deleted))
    }

    async fn load_configuration(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT key, value FROM configuration ORDER BY key")
                .fetch_all(self)
                .await?,
        )
    }

    async fn configuration_version(&self) -> Result<String, StoreError> {
        let (count, newest): (i64, Option<chrono::DateTime<chrono::Utc>>) =
            sqlx::query_as("SELECT count(*), max(last_modified) FROM configuration")
                .fetch_one(self)
                .await?;
        Ok(format!(
            "{count}:{}",
            newest.map(|t| t.timestamp_micros()).unwrap_or_default()
        ))
    }

    async fn set_configuration(
        &self,
        key: &str,
        value: &serde_json::Value,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        // Writers take turns, and each reads the clock only once it holds the lock
        // (clock_timestamp, not the transaction's start time now()). Otherwise a
        // change stamped T1 could commit after one stamped T2 > T1: a replica that
        // polled in between would have seen max = T2 already and never notice it.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CONFIGURATION_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO configuration (key, value, last_modified) \
             VALUES ($1, $2, clock_timestamp()) \
             ON CONFLICT (key) DO UPDATE \
             SET value = EXCLUDED.value, last_modified = EXCLUDED.last_modified",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        sqlx::query(
            "SELECT kid, algorithm, public_key, private_key_encrypted, created_at, activates_at \
             FROM signing_keys ORDER BY activates_at, created_at, kid",
        )
        .fetch_all(self)
        .await?
        .iter()
        .map(key_from_row)
        .collect()
    }

    async fn add_signing_key(
        &self,
        key: &StoredKey,
        expected_newest: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        // Compare-and-insert under a lock: of replicas rotating at once, the first
        // inserts and the others find the newest key changed.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SIGNING_KEY_LOCK)
            .execute(&mut *tx)
            .await?;
        let newest: Option<String> = sqlx::query_scalar(
            "SELECT kid FROM signing_keys \
             ORDER BY activates_at DESC, created_at DESC, kid DESC LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        if newest.as_deref() != expected_newest {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO signing_keys \
             (kid, algorithm, public_key, private_key_encrypted, created_at, activates_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.kid)
        .bind(&key.algorithm)
        .bind(&key.public_key)
        .bind(&key.private_key_encrypted)
        .bind(key.created_at)
        .bind(key.activates_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict)?;
        tx.commit().await?;
        Ok(true)
    }

    async fn delete_signing_keys(&self, kids: &[String]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM signing_keys WHERE kid = ANY($1)")
            .bind(kids)
            .execute(self)
            .await?;
        Ok(())
    }
}
