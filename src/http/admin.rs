//! `/v1/admin/*`: users, roles, runtime configuration and the audit log, for
//! callers whose token grants `auth:admin`. Every change is audited in the same
//! transaction; disabling, deleting or resetting a user ends their sessions.

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    error::{ApiError, Problem},
    extract::{Admin, Client, Json, Path, Query},
};
use crate::{
    app::AppState,
    auth::{self, admin_event, UserChanges},
    runtime_config::{ConfigValueError, RuntimeConfig},
    store::IdentityStore,
    users::{self, AuditQuery, Role, StoredAuditEvent, User},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, update_user, delete_user))
        .routes(routes!(list_roles, create_role))
        .routes(routes!(get_role, update_role, delete_role))
        .routes(routes!(get_config))
        .routes(routes!(set_config))
        .routes(routes!(audit_log))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListUsersQuery {
    /// Page size, 1–200 (default 50).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only usernames containing this (case-insensitive).
    pub username: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UserList {
    pub users: Vec<User>,
    pub next_cursor: Option<String>,
}

/// List users, paginated.
#[utoipa::path(get, path = "/v1/admin/users", tag = "admin", security(("bearer" = [])), params(ListUsersQuery),
    responses(
        (status = 200, description = "A page of users", body = UserList),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_users(
    State(state): State<AppState>,
    Admin(_): Admin,
    Query(q): Query<ListUsersQuery>,
) -> Result<axum::Json<UserList>, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::validation("limit", "must be from 1 to 200"));
    }
    let page = state
        .db
        .list_users(q.username.as_deref(), q.cursor.as_deref(), limit)
        .await?;
    Ok(axum::Json(UserList {
        users: page.users,
        next_cursor: page.next_cursor,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    #[schema(example = "bob", pattern = r"^[A-Za-z0-9._@+-]{1,64}$")]
    pub username: String,
    #[schema(example = "bob@example.com")]
    pub email: Option<String>,
    #[schema(example = "a long passphrase nobody guesses")]
    pub password: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

/// Create a user.
#[utoipa::path(post, path = "/v1/admin/users", tag = "admin", security(("bearer" = [])), request_body = CreateUser,
    responses(
        (status = 201, description = "Created", body = User),
        (status = 409, description = "Username (any case) or email taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field, weak password or unknown role", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_user(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Client(client): Client,
    Json(body): Json<CreateUser>,
) -> Result<Response, ApiError> {
    let user = auth::create_user(
        &state,
        &body.username,
        body.email.as_deref(),
        SecretString::from(body.password),
        body.roles,
        |username, roles| {
            admin_event(
                "admin_user_create",
                &admin,
                &client,
                serde_json::json!({ "target": username, "roles": roles }),
            )
        },
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(user)).into_response())
}

/// Read a user.
#[utoipa::path(get, path = "/v1/admin/users/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "User id")),
    responses(
        (status = 200, description = "The user", body = User),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_user(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<User>, ApiError> {
    state
        .db
        .get_user(id)
        .await?
        .map(axum::Json)
        .ok_or(ApiError::NotFound)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchUser {
    /// A new email; `null` clears it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub email: Option<Option<String>>,
    pub disabled: Option<bool>,
    /// Replaces the user's roles; in force at once: tokens minted before stop
    /// validating, and the next refresh carries the new roles.
    pub roles: Option<Vec<String>>,
    /// Resets the password; ends the user's sessions.
    pub password: Option<String>,
}

/// Distinguishes an absent field (leave alone) from `null` (clear).
fn double_option<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Update a user: email, disabled, roles, password reset.
#[utoipa::path(patch, path = "/v1/admin/users/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "User id")), request_body = PatchUser,
    responses(
        (status = 200, description = "Updated", body = User),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Email taken, or the change would leave no administrator", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update_user(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Client(client): Client,
    Path(id): Path<Uuid>,
    Json(body): Json<PatchUser>,
) -> Result<axum::Json<User>, ApiError> {
    let changes = UserChanges {
        email: body.email,
        disabled: body.disabled,
        roles: body.roles,
        password: body.password.map(SecretString::from),
    };
    let user = auth::update_user(&state, &admin, &client, id, changes).await?;
    Ok(axum::Json(user))
}

/// Delete a user and end their sessions.
#[utoipa::path(delete, path = "/v1/admin/users/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "User id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The last administrator cannot be deleted", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_user(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Client(client): Client,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    auth::delete_user(&state, &admin, &client, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List roles with their permissions.
#[utoipa::path(get, path = "/v1/admin/roles", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "Roles", body = [Role])))]
pub async fn list_roles(
    State(state): State<AppState>,
    Admin(_): Admin,
) -> Result<axum::Json<Vec<Role>>, ApiError> {
    Ok(axum::Json(state.db.list_roles().await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRole {
    /// 1 to 128 printable ASCII characters, no comma.
    #[schema(example = "editors", pattern = r"^[!-+\--~]{1,128}$")]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub permissions: Vec<String>,
}

/// Create a role.
#[utoipa::path(post, path = "/v1/admin/roles", tag = "admin", security(("bearer" = [])), request_body = CreateRole,
    responses(
        (status = 201, description = "Created", body = Role),
        (status = 409, description = "Exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid name or permission", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_role(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Client(client): Client,
    Json(body): Json<CreateRole>,
) -> Result<Response, ApiError> {
    let name = users::validate_names("name", std::slice::from_ref(&body.name))?.remove(0);
    let permissions = users::validate_names("permissions", &body.permissions)?;
    users::validate_description(&body.description)?;
    let event = admin_event(
        "admin_role_create",
        &admin,
        &client,
        serde_json::json!({ "role": name, "permissions": permissions }),
    );
    let role = state
        .db
        .create_role(
            &Role {
                name,
                description: body.description,
                permissions,
            },
            &event,
        )
        .await?;
    Ok((StatusCode::CREATED, axum::Json(role)).into_response())
}

/// Read a role.
#[utoipa::path(get, path = "/v1/admin/roles/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "Role name")),
    responses(
        (status = 200, description = "The role", body = Role),
        (status = 404, description = "No such role", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_role(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(name): Path<String>,
) -> Result<axum::Json<Role>, ApiError> {
    state
        .db
        .get_role(&name)
        .await?
        .map(axum::Json)
        .ok_or(ApiError::NotFound)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchRole {
    pub description: Option<String>,
    /// Replaces the permissions; in force at once for every holder of the role.
    pub permissions: Option<Vec<String>>,
}

/// Update a role's description or permissions.
#[utoipa::path(patch, path = "/v1/admin/roles/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "Role name")), request_body = PatchRole,
    responses(
        (status = 200, description = "Updated", body = Role),
        (status = 404, description = "No such role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The change would leave no administrator", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid permission", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update_role(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Client(client): Client,
    Path(name): Path<String>,
    Json(body): Json<PatchRole>,
) -> Result<axum::Json<Role>, ApiError> {
    let role = auth::update_role(
        &state,
        &admin,
        &client,
        &name,
        body.description,
        body.permissions,
    )
    .await?;
    Ok(axum::Json(role))
}

/// Delete a role (its assignments go with it).
#[utoipa::path(delete, path = "/v1/admin/roles/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "Role name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The change would leave no administrator", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_role(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Client(client): Client,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth::delete_role(&state, &admin, &client, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every runtime configuration key with the value in force.
#[utoipa::path(get, path = "/v1/admin/config", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "Key → value", body = Object)))]
pub async fn get_config(
    State(state): State<AppState>,
    Admin(_): Admin,
) -> Result<axum::Json<serde_json::Map<String, serde_json::Value>>, ApiError> {
    // Read through to the store so the answer reflects a change made a moment ago
    // on another replica, not this replica's last poll.
    let entries = state.db.load_configuration().await?;
    Ok(axum::Json(RuntimeConfig::from_entries(&entries).to_map()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigValue {
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
}

/// Set one runtime configuration key; every replica applies it within 5 s.
#[utoipa::path(put, path = "/v1/admin/config/{key}", tag = "admin", security(("bearer" = [])),
    params(("key" = String, Path, description = "Configuration key")), request_body = ConfigValue,
    responses(
        (status = 200, description = "Every key with the value in force", body = Object),
        (status = 422, description = "Unknown key, wrong type or out of range", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn set_config(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Client(client): Client,
    Path(key): Path<String>,
    Json(body): Json<ConfigValue>,
) -> Result<axum::Json<serde_json::Map<String, serde_json::Value>>, ApiError> {
    let entries = state.db.load_configuration().await?;
    let mut config = RuntimeConfig::from_entries(&entries);
    config.set(&key, &body.value).map_err(|e| match e {
        ConfigValueError::UnknownKey(_) => ApiError::validation("key", e.to_string()),
        ConfigValueError::Invalid { .. } => ApiError::validation("value", e.to_string()),
    })?;
    let event = admin_event(
        "admin_config_set",
        &admin,
        &client,
        serde_json::json!({ "key": key, "value": body.value }),
    );
    state
        .db
        .set_configuration(&key, &body.value, &event)
        .await?;
    if let Err(e) = state.runtime.refresh(&state.db).await {
        tracing::warn!(error = %e, "configuration stored; this replica applies it at its next poll");
    }
    Ok(axum::Json(config.to_map()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only events about this user.
    pub user_id: Option<Uuid>,
    /// Only events of this kind (`login`, `lockout`, `admin_user_update`, ...).
    pub kind: Option<String>,
    /// Only events with this outcome (`success`, `failure`, ...).
    pub outcome: Option<String>,
    /// Only events at or after this time (RFC 3339).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events before this time (RFC 3339).
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Page size, 1–500 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub events: Vec<StoredAuditEvent>,
    /// Pass as `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Security audit events, newest first, filtered and paginated.
#[utoipa::path(get, path = "/v1/admin/audit", tag = "admin", security(("bearer" = [])), params(AuditParams),
    responses(
        (status = 200, description = "A page of events", body = AuditPage),
        (status = 422, description = "A malformed filter or cursor", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn audit_log(
    State(state): State<AppState>,
    Admin(_): Admin,
    Query(q): Query<AuditParams>,
) -> Result<axum::Json<AuditPage>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::validation("limit", "must be from 1 to 500"));
    }
    let before_id = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::validation("cursor", "is not a cursor this API gave"))
        })
        .transpose()?;
    let (events, next_cursor) = auth::audit_page(
        &state,
        AuditQuery {
            user_id: q.user_id,
            kind: q.kind,
            outcome: q.outcome,
            since: q.since,
            until: q.until,
            before_id,
            limit,
        },
    )
    .await?;
    Ok(axum::Json(AuditPage {
        events,
        next_cursor,
    }))
}
