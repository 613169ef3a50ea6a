//! Users, roles and permissions: the identity that tokens carry.
//!
//! These are the domain types shared by the HTTP layer and the stores; the
//! storage interface is [`crate::store::IdentityStore`].

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
}

/// A user with the PHC hash, for login only.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: User,
    pub password_hash: String,
}

/// What creating a user needs; the password is already hashed.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: String,
    pub email: Option<String>,
    pub password_hash: String,
    pub roles: Vec<String>,
}

/// A partial update; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct UserUpdate {
    /// `Some(None)` clears the email.
    pub email: Option<Option<String>>,
    pub disabled: Option<bool>,
    pub roles: Option<Vec<String>>,
    pub password_hash: Option<String>,
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
