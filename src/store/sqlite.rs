//! [`IdentityStore`] on the embedded SQLite file (development and single-instance
//! use).
//!
//! The same behaviour as [`super::postgres`], with SQLite's means: lists are passed
//! as one JSON array and unpacked with `json_each` (SQLite has no array type),
//! roles and permissions come back through `json_group_array`, UUIDs are
//! hyphenated text and timestamps fixed-width UTC text (see the migration).
//!
//! Every write transaction starts with `BEGIN IMMEDIATE`, taking SQLite's single
//! write lock up front. A deferred transaction that reads and then writes fails at
//! once with SQLITE_BUSY when another connection wrote in between (the busy
//! timeout cannot help there), and the read-check-write operations
//! (`create_first_user`, `add_signing_key`) would not be atomic without it.

use chrono::{DateTime, Utc};
use sqlx::{sqlite::SqliteRow, types::Json, Row, SqliteConnection, SqlitePool};
use uuid::{fmt::Hyphenated, Uuid};

use super::{
    database::{audit_for_new_user, conflict, distinct_sorted},
    IdentityStore, StoreError, StoredKey,
};
use crate::users::{
    AuditEvent, AuditQuery, AuthzVersion, Credentials, NewUser, Role, RoleUpdate, StoredAuditEvent,
    User, UserPage, UserUpdate, ADMIN_PERMISSION,
};

const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// The columns of a [`User`], roles and permissions included, for `FROM users u`.
const USER_COLUMNS: &str = "u.id, u.username, u.email, u.disabled, u.created_at, \
    u.updated_at, u.password_changed_at, u.authz_version, \
    (SELECT json_group_array(ur.role_name) FROM user_roles ur WHERE ur.user_id = u.id) \
    AS roles, \
    (SELECT json_group_array(DISTINCT rp.permission) FROM user_roles ur \
     JOIN role_permissions rp ON rp.role_name = ur.role_name \
     WHERE ur.user_id = u.id) AS permissions";

/// The columns of a [`Role`], for `FROM roles r`.
const ROLE_COLUMNS: &str = "r.name, r.description, \
    (SELECT json_group_array(rp.permission) FROM role_permissions rp \
     WHERE rp.role_name = r.name) AS permissions";

/// A timestamp as stored: fixed-width, so that comparing and sorting the text
/// compares and sorts the times. Microseconds, like PostgreSQL.
fn timestamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn now() -> String {
    timestamp(Utc::now())
}

/// A `json_group_array` result: a JSON array of strings.
fn string_list(row: &SqliteRow, column: &str) -> Result<Vec<String>, StoreError> {
    let text: Option<String> = row.try_get(column)?;
    let items = match text {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))?,
        None => Vec::new(),
    };
    Ok(distinct_sorted(items))
}

fn user_from_row(row: &SqliteRow) -> Result<User, StoreError> {
    Ok(User {
        id: row.try_get::<Hyphenated, _>("id")?.into_uuid(),
        username: row.try_get("username")?,
        email: row.try_get("email")?,
        disabled: row.try_get("disabled")?,
        roles: string_list(row, "roles")?,
        permissions: string_list(row, "permissions")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        password_changed_at: row.try_get("password_changed_at")?,
        authz_version: u64::try_from(row.try_get::<i64, _>("authz_version")?)
            .map_err(|_| StoreError::Corrupt("authz_version".into()))?,
    })
}

/// Enabled users whose roles grant the admin permission. (The write transaction
/// every caller holds serializes the changes that could remove the last one.)
async fn count_admins(conn: &mut SqliteConnection) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(DISTINCT u.id) FROM users u \
         JOIN user_roles ur ON ur.user_id = u.id \
         JOIN role_permissions rp ON rp.role_name = ur.role_name \
         WHERE rp.permission = ?1 AND NOT u.disabled",
    )
    .bind(ADMIN_PERMISSION)
    .fetch_one(conn)
    .await?)
}

/// Fails the transaction with `LastAdmin` when it would take the service from
/// some administrators to none.
async fn refuse_no_admins_left(conn: &mut SqliteConnection, before: i64) -> Result<(), StoreError> {
    if before > 0 && count_admins(conn).await? == 0 {
        return Err(StoreError::LastAdmin);
    }
    Ok(())
}

/// Raises the authorization version of every user holding `role`; returns their
/// new versions.
async fn bump_role_holders(
    conn: &mut SqliteConnection,
    role: &str,
) -> Result<Vec<AuthzVersion>, StoreError> {
    let rows: Vec<(Hyphenated, i64)> = sqlx::query_as(
        "UPDATE users SET authz_version = authz_version + 1 \
         WHERE id IN (SELECT user_id FROM user_roles WHERE role_name = ?1) \
         RETURNING id, authz_version",
    )
    .bind(role)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(user_id, version)| {
            Ok(AuthzVersion {
                user_id: user_id.into_uuid(),
                version: u64::try_from(version)
                    .map_err(|_| StoreError::Corrupt("authz_version".into()))?,
            })
        })
        .collect()
}

fn role_from_row(row: &SqliteRow) -> Result<Role, StoreError> {
    Ok(Role {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        permissions: string_list(row, "permissions")?,
    })
}

fn key_from_row(row: &SqliteRow) -> Result<StoredKey, StoreError> {
    Ok(StoredKey {
        kid: row.try_get("kid")?,
        algorithm: row.try_get("algorithm")?,
        public_key: row.try_get("public_key")?,
        private_key_encrypted: row.try_get("private_key_encrypted")?,
        created_at: row.try_get("created_at")?,
        activates_at: row.try_get("activates_at")?,
    })
}

async fn fetch_user(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<User>, StoreError> {
    sqlx::query(&format!(
        "SELECT {USER_COLUMNS} FROM users u WHERE u.id = ?1"
    ))
    .bind(id.hyphenated())
    .fetch_optional(conn)
    .await?
    .map(|row| user_from_row(&row))
    .transpose()
}

async fn fetch_role(conn: &mut SqliteConnection, name: &str) -> Result<Option<Role>, StoreError> {
    sqlx::query(&format!(
        "SELECT {ROLE_COLUMNS} FROM roles r WHERE r.name = ?1"
    ))
    .bind(name)
    .fetch_optional(conn)
    .await?
    .map(|row| role_from_row(&row))
    .transpose()
}

/// Fails with `Invalid` naming the first role that does not exist. The write
/// transaction keeps them from disappearing before they are assigned.
async fn check_roles_exist(
    conn: &mut SqliteConnection,
    roles: &[String],
) -> Result<(), StoreError> {
    if roles.is_empty() {
        return Ok(());
    }
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM roles WHERE name IN (SELECT value FROM json_each(?1))",
    )
    .bind(Json(roles))
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
    conn: &mut SqliteConnection,
    user_id: Uuid,
    roles: &[String],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM user_roles WHERE user_id = ?1")
        .bind(user_id.hyphenated())
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO user_roles (user_id, role_name) \
         SELECT DISTINCT ?1, value FROM json_each(?2)",
    )
    .bind(user_id.hyphenated())
    .bind(Json(roles))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Replaces the role's permissions.
async fn set_role_permissions(
    conn: &mut SqliteConnection,
    role: &str,
    permissions: &[String],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM role_permissions WHERE role_name = ?1")
        .bind(role)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO role_permissions (role_name, permission) \
         SELECT DISTINCT ?1, value FROM json_each(?2)",
    )
    .bind(role)
    .bind(Json(permissions))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn insert_audit(conn: &mut SqliteConnection, event: &AuditEvent) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events \
         (occurred_at, kind, user_id, username, client_ip, outcome, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(now())
    .bind(event.kind)
    .bind(event.user_id.map(|id| id.hyphenated()))
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
    conn: &mut SqliteConnection,
    user: &NewUser,
    audit: &AuditEvent,
) -> Result<User, StoreError> {
    check_roles_exist(conn, &user.roles).await?;
    let id = Uuid::new_v4();
    let now = now();
    sqlx::query(
        "INSERT INTO users \
         (id, username, email, password_hash, disabled, \
          created_at, updated_at, password_changed_at) \
         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?5, ?5)",
    )
    .bind(id.hyphenated())
    .bind(&user.username)
    .bind(user.email.as_deref())
    .bind(&user.password_hash)
    .bind(&now)
    .execute(&mut *conn)
    .await
    .map_err(conflict)?;
    set_user_roles(conn, id, &user.roles).await?;
    insert_audit(conn, &audit_for_new_user(audit, id, &user.username)).await?;
    fetch_user(conn, id).await?.ok_or(StoreError::NotFound)
}

impl IdentityStore for SqlitePool {
    async fn create_user(&self, user: &NewUser, audit: &AuditEvent) -> Result<User, StoreError> {
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
        let created = insert_user(&mut tx, user, audit).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn get_user(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        fetch_user(&mut *self.acquire().await?, id).await
    }

    async fn find_credentials(&self, username: &str) -> Result<Option<Credentials>, StoreError> {
        // Served by the unique index on lower(username).
        sqlx::query(&format!(
            "SELECT {USER_COLUMNS}, u.password_hash FROM users u \
             WHERE lower(u.username) = lower(?1)"
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
        // See the PostgreSQL version: instr is a literal substring match (no LIKE
        // wildcards to escape); keyset on the unique lower(username); one row more
        // than asked tells whether there is a next page.
        let limit = limit.max(1) as usize;
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users u \
             WHERE (?1 IS NULL OR instr(lower(u.username), lower(?1)) > 0) \
               AND (?2 IS NULL OR lower(u.username) > lower(?2)) \
             ORDER BY lower(u.username) \
             LIMIT ?3"
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
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
        let before = fetch_user(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        let admins = if update.roles.is_some() || update.disabled == Some(true) {
            Some(count_admins(&mut tx).await?)
        } else {
            None
        };
        sqlx::query(
            "UPDATE users SET \
                 email = CASE WHEN ?2 THEN ?3 ELSE email END, \
                 disabled = COALESCE(?4, disabled), \
                 password_hash = COALESCE(?5, password_hash), \
                 password_changed_at = CASE WHEN ?5 IS NULL THEN password_changed_at ELSE ?6 END, \
                 updated_at = ?6 \
             WHERE id = ?1",
        )
        .bind(id.hyphenated())
        .bind(update.email.is_some())
        .bind(update.email.clone().flatten())
        .bind(update.disabled)
        .bind(update.password_hash.as_deref())
        .bind(now())
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
                "UPDATE users SET authz_version = authz_version + 1 WHERE id = ?1 \
                 RETURNING authz_version",
            )
            .bind(id.hyphenated())
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
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
        let admins = count_admins(&mut tx).await?;
        let deleted = sqlx::query("DELETE FROM users WHERE id = ?1")
            .bind(id.hyphenated())
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
        // Only over the hash the caller verified (see the PostgreSQL version).
        let updated =
            sqlx::query("UPDATE users SET password_hash = ?3 WHERE id = ?1 AND password_hash = ?2")
                .bind(id.hyphenated())
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
        // BEGIN IMMEDIATE makes check-then-insert atomic: a second caller waits for
        // the write lock and then sees the first one's user.
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
        let any_user: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users)")
            .fetch_one(&mut *tx)
            .await?;
        if any_user {
            return Ok(None);
        }
        sqlx::query(
            "INSERT INTO roles (name, description, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&role.name)
        .bind(&role.description)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        // Adds the role's permissions even when the role already existed: the first
        // administrator must be able to administer. Nothing is removed. (`WHERE true`
        // is SQLite's required disambiguation for INSERT ... SELECT ... ON CONFLICT.)
        sqlx::query(
            "INSERT INTO role_permissions (role_name, permission) \
             SELECT DISTINCT ?1, value FROM json_each(?2) WHERE true \
             ON CONFLICT DO NOTHING",
        )
        .bind(&role.name)
        .bind(Json(&role.permissions))
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
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
        sqlx::query("INSERT INTO roles (name, description, created_at) VALUES (?1, ?2, ?3)")
            .bind(&role.name)
            .bind(&role.description)
            .bind(now())
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
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
        let before = fetch_role(&mut tx, name)
            .await?
            .ok_or(StoreError::NotFound)?;
        let admins = match update.permissions {
            Some(_) => Some(count_admins(&mut tx).await?),
            None => None,
        };
        sqlx::query("UPDATE roles SET description = COALESCE(?2, description) WHERE name = ?1")
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
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
        let admins = count_admins(&mut tx).await?;
        let bumped = bump_role_holders(&mut tx, name).await?;
        // Cascades to its permissions and assignments (the pool turns foreign keys
        // on for every connection).
        let deleted = sqlx::query("DELETE FROM roles WHERE name = ?1")
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
             WHERE (?1 IS NULL OR user_id = ?1) \
               AND (?2 IS NULL OR kind = ?2) \
               AND (?3 IS NULL OR outcome = ?3) \
               AND (?4 IS NULL OR occurred_at >= ?4) \
               AND (?5 IS NULL OR occurred_at < ?5) \
               AND (?6 IS NULL OR id < ?6) \
             ORDER BY id DESC LIMIT ?7",
        )
        .bind(q.user_id.map(|id| id.hyphenated()))
        .bind(q.kind.as_deref())
        .bind(q.outcome.as_deref())
        .bind(q.since.map(timestamp))
        .bind(q.until.map(timestamp))
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
                user_id: row
                    .try_get::<Option<Hyphenated>, _>("user_id")?
                    .map(Hyphenated::into_uuid),
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
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<Option<u64>, StoreError> {
        // One process; the write lock keeps each batch short.
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
        let deleted = sqlx::query(
            "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events \
             WHERE occurred_at < ?1 ORDER BY id LIMIT ?2)",
        )
        .bind(timestamp(before))
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
        // The stored text, as is: fixed-width, so max() is the newest.
        let (count, newest): (i64, Option<String>) =
            sqlx::query_as("SELECT count(*), max(last_modified) FROM configuration")
                .fetch_one(self)
                .await?;
        Ok(format!("{count}:{}", newest.unwrap_or_default()))
    }

    async fn set_configuration(
        &self,
        key: &str,
        value: &serde_json::Value,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        // The time is read once the write lock is held, so stamps follow commit
        // order (see the PostgreSQL version for why that matters).
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
        sqlx::query(
            "INSERT INTO configuration (key, value, last_modified) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE \
             SET value = excluded.value, last_modified = excluded.last_modified",
        )
        .bind(key)
        .bind(value)
        .bind(now())
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
        // Compare-and-insert inside one write transaction.
        let mut tx = self.begin_with(BEGIN_WRITE).await?;
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&key.kid)
        .bind(&key.algorithm)
        .bind(&key.public_key)
        .bind(&key.private_key_encrypted)
        .bind(timestamp(key.created_at))
        .bind(timestamp(key.activates_at))
        .execute(&mut *tx)
        .await
        .map_err(conflict)?;
        tx.commit().await?;
        Ok(true)
    }

    async fn delete_signing_keys(&self, kids: &[String]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM signing_keys WHERE kid IN (SELECT value FROM json_each(?1))")
            .bind(Json(kids))
            .execute(self)
            .await?;
        Ok(())
    }
}
