//! Users, roles and permissions: the identity that tokens carry.
//!
//! These are the domain types shared by the HTTP layer and the stores; the
//! storage interface is [`crate::store::IdentityStore`].

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The permission that opens the admin API.
pub const ADMIN_PERMISSION: &str = "auth:admin";
/// The role bootstrap creates and gives the first administrator.
pub const ADMIN_ROLE: &str = "admin";

/// A field that breaks a rule; the text is safe to show the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

/// Usernames: 1–64 characters of letters, digits and `. _ @ + -`, so they are
/// safe in headers, logs and URLs. The same rule for the API and the CLI.
pub fn validate_username(username: &str) -> Result<String, FieldError> {
    let ok = (1..=64).contains(&username.chars().count())
        && username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-'));
    if ok {
        Ok(username.to_owned())
    } else {
        Err(FieldError {
            field: "username",
            message: "must be 1 to 64 letters, digits or . _ @ + -".into(),
        })
    }
}

/// The one form a username is compared in: usernames are ASCII (see
/// [`validate_username`]) and case-insensitive, so lower-cased with ASCII rules,
/// the same in every store and lockout key whatever the locale. None for a name
/// that breaks the username rules: no account can have it, so a login with it is
/// refused without a lookup (a Unicode lookalike such as `ADMİN` never reaches a
/// database whose `lower()` might fold it into `admin`).
pub fn login_name(username: &str) -> Option<String> {
    validate_username(username)
        .ok()
        .map(|name| name.to_ascii_lowercase())
}

/// Role and permission names: 1 to 128 printable ASCII characters without a
/// comma (they travel comma-separated in `X-Auth-Roles`). Returns them sorted,
/// without duplicates.
pub fn validate_names(field: &'static str, names: &[String]) -> Result<Vec<String>, FieldError> {
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let ok =
            (1..=128).contains(&n.len()) && n.chars().all(|c| c.is_ascii_graphic() && c != ',');
        if !ok {
            return Err(FieldError {
                field,
                message: format!("{n:?} is not a valid name"),
            });
        }
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    out.sort();
    Ok(out)
}

/// A role's description: at most 1024 bytes.
pub fn validate_description(description: &str) -> Result<(), FieldError> {
    if description.len() > 1024 {
        return Err(FieldError {
            field: "description",
            message: "must be at most 1024 bytes".into(),
        });
    }
    Ok(())
}

/// An optional email: empty means none; otherwise a plausible address.
pub fn validate_email(email: Option<&str>) -> Result<Option<String>, FieldError> {
    match email.map(str::trim) {
        None | Some("") => Ok(None),
        Some(e)
            if e.len() <= 254
                && e.split_once('@')
                    .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
                && !e.chars().any(char::is_whitespace) =>
        {
            Ok(Some(e.to_owned()))
        }
        Some(_) => Err(FieldError {
            field: "email",
            message: "is not an email address".into(),
        }),
    }
}

/// The built-in administrator role, as bootstrap and `create-user --role admin`
/// create it.
pub fn admin_role() -> Role {
    Role {
        name: ADMIN_ROLE.into(),
        description: "Administers users, roles and configuration".into(),
        permissions: vec![ADMIN_PERMISSION.into()],
    }
}

/// A user as the API shows it (never with the password hash).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub username: String,
    pub email: Option<String>,
    pub disabled: bool,
    pub roles: Vec<String>,
    /// Union of the permissions of the user's roles, sorted.
    pub permissions: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub password_changed_at: DateTime<Utc>,
    /// Raised by every change of what the user may do (see
    /// [`crate::store::IdentityStore`]); tokens carry it. Internal: not shown.
    #[serde(skip)]
    #[schema(ignore)]
    pub authz_version: u64,
}

impl User {
    /// Whether `self` may do other things than `before` did: other roles,
    /// permissions, or the disabled flag flipped.
    pub fn changes_authorization_of(&self, before: &User) -> bool {
        self.roles != before.roles
            || self.permissions != before.permissions
            || self.disabled != before.disabled
    }
}

/// A user's authorization version after a change (see [`User::authz_version`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthzVersion {
    pub user_id: Uuid,
    pub version: u64,
}

/// Stands in for a secret (a token, a password hash) in `Debug` output, so a
/// `{:?}` in a log line or a panic message cannot leak one.
pub struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// A user with the PHC hash, for login only.
#[derive(Clone)]
pub struct Credentials {
    pub user: User,
    pub password_hash: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password_hash", &Redacted)
            .finish()
    }
}

/// What creating a user needs; the password is already hashed.
#[derive(Clone)]
pub struct NewUser {
    pub username: String,
    pub email: Option<String>,
    pub password_hash: String,
    pub roles: Vec<String>,
}

impl fmt::Debug for NewUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewUser")
            .field("username", &self.username)
            .field("email", &self.email)
            .field("password_hash", &Redacted)
            .field("roles", &self.roles)
            .finish()
    }
}

/// A partial update; `None` leaves a field alone.
#[derive(Clone, Default)]
pub struct UserUpdate {
    /// `Some(None)` clears the email.
    pub email: Option<Option<String>>,
    pub disabled: Option<bool>,
    pub roles: Option<Vec<String>>,
    pub password_hash: Option<String>,
}

impl fmt::Debug for UserUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserUpdate")
            .field("email", &self.email)
            .field("disabled", &self.disabled)
            .field("roles", &self.roles)
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| Redacted),
            )
            .finish()
    }
}

/// A role and the permissions it grants.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub permissions: Vec<String>,
}

/// A partial update of a role.
#[derive(Debug, Clone, Default)]
pub struct RoleUpdate {
    pub description: Option<String>,
    pub permissions: Option<Vec<String>>,
}

/// A page of users, ordered by lower-cased username.
#[derive(Debug, Clone)]
pub struct UserPage {
    pub users: Vec<User>,
    /// Pass as `cursor` to get the next page; None on the last page.
    pub next_cursor: Option<String>,
}

/// A security audit event. `detail` never holds a secret.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    pub kind: &'static str,
    pub user_id: Option<Uuid>,
    pub username: Option<String>,
    pub client_ip: Option<String>,
    pub outcome: &'static str,
    pub detail: serde_json::Value,
}

impl AuditEvent {
    pub fn new(kind: &'static str, outcome: &'static str) -> Self {
        Self {
            kind,
            user_id: None,
            username: None,
            client_ip: None,
            outcome,
            detail: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn user(mut self, id: Uuid, username: impl Into<String>) -> Self {
        self.user_id = Some(id);
        self.username = Some(username.into());
        self
    }

    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    pub fn ip(mut self, ip: Option<std::net::IpAddr>) -> Self {
        self.client_ip = ip.map(|ip| ip.to_string());
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// Which audit events to read: every filter optional, newest first from
/// `before_id` (exclusive).
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub user_id: Option<Uuid>,
    pub kind: Option<String>,
    pub outcome: Option<String>,
    /// Inclusive.
    pub since: Option<DateTime<Utc>>,
    /// Exclusive.
    pub until: Option<DateTime<Utc>>,
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// A stored audit event, as read back.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StoredAuditEvent {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub kind: String,
    pub user_id: Option<Uuid>,
    pub username: Option<String>,
    pub client_ip: Option<String>,
    pub outcome: String,
    pub detail: serde_json::Value,
}
