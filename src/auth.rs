//! The authentication domain: login, refresh, validation, logout, password change.
//!
//! Handlers call these with parsed input; these call the stores. Failure semantics
//! follow the contract's table: login needs PostgreSQL and the session store;
//! validation needs neither the database (keys are in memory) nor, under the
//! degraded outage policy, Redis; refresh falls back to the session's identity
//! snapshot while PostgreSQL is down.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicI64, Ordering},
};

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    app::AppState,
    config::OutagePolicy,
    passwords::{self, HashError},
    sessions::{LockoutPolicy, RefreshOutcome, Session, SessionStore},
    store::{IdentityStore, StoreError},
    tokens::{refresh::RefreshToken, Claims, Subject, TokenError},
    users::{self, AuditEvent, FieldError, NewUser, User, UserUpdate},
};

/// The domain's errors; the HTTP layer maps each to one status.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("invalid token")]
    InvalidToken,
    #[error("missing permission {0}")]
    Forbidden(String),
    #[error("too many failed logins; retry after {0} s")]
    Locked(u64),
    #[error("{0}")]
    Invalid(&'static str, String),
    #[error("password hashing is saturated")]
    Overloaded,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<FieldError> for AuthError {
    fn from(e: FieldError) -> Self {
        Self::Invalid(e.field, e.message)
    }
}

impl From<HashError> for AuthError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Overloaded => Self::Overloaded,
            HashError::Internal(m) => Self::Internal(m),
        }
    }
}

impl From<TokenError> for AuthError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Invalid | TokenError::UnknownKey => Self::InvalidToken,
            other => Self::Internal(other.to_string()),
        }
    }
}

/// What login and refresh hand out.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    pub refresh_token: String,
    /// Seconds the refresh token stays usable if unused (idle timeout, capped by
    /// the session's absolute end).
    pub refresh_expires_in: u64,
    pub session_id: Uuid,
}

/// Who is calling, as far as the network says.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn seconds_to_ms(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX / 4)
}

fn ms_to_seconds_ceil(ms: i64) -> u64 {
    u64::try_from((ms.max(0) + 999) / 1000).unwrap_or(0).max(1)
}

/// Records an audit event without failing the request: the event matters, but a
/// user who logged in successfully must not get an error because of it.
async fn audit(state: &AppState, event: AuditEvent) {
    if let Err(e) = state.db.record_audit(&event).await {
        tracing::warn!(kind = event.kind, error = %e, "audit event not recorded");
    }
}

/// Usernames and passwords longer than this are refused before any lookup or hash.
const MAX_USERNAME_LEN: usize = 256;

pub async fn login(
    state: &AppState,
    username: &str,
    password: SecretString,
    client: &ClientInfo,
) -> Result<TokenPair, AuthError> {
    let policy = state.runtime.get();
    let metrics = &state.metrics;
    let ip = client.ip.map(|ip| ip.to_string());
    let lockout = LockoutPolicy {
        threshold: policy.lockout_threshold,
        window_ms: seconds_to_ms(policy.lockout_window_seconds),
        ip_limit: policy.failed_logins_per_ip_per_minute,
    };
    let now = now_ms();

    let result = async {
        if let Some(ip) = &ip {
            let (failures, reset_ms) = state.sessions.ip_failures(ip, now).await?;
            if failures >= lockout.ip_limit {
                metrics.lockouts.with_label_values(&["ip"]).inc();
                return Err(AuthError::Locked(ms_to_seconds_ceil(reset_ms)));
            }
        }
        if username.is_empty() || username.len() > MAX_USERNAME_LEN {
            return Err(AuthError::InvalidCredentials);
        }
        if let Some(remaining) = state.sessions.login_lock(username, now).await? {
            return Err(AuthError::Locked(ms_to_seconds_ceil(remaining)));
        }
        // An over-long password cannot be right (the policy refused it when it
        // was set), and hashing a megabyte would burn CPU: fail like a wrong one.
        let too_long = password.expose_secret().chars().count()
            > usize::try_from(policy.password_max_length).unwrap_or(usize::MAX);
        // The hashing place first: when hashing is saturated, the attempt is
        // refused before it costs a query on the database every replica shares.
        let slot = if too_long {
            None
        } else {
            Some(state.hasher.reserve()?)
        };
        let credentials = state.db.find_credentials(username).await?;
        let (user, phc) = match credentials {
            Some(c) if !c.user.disabled => (Some(c.user), Some(c.password_hash)),
            _ => (None, None),
        };
        let verification = match slot {
            None => None,
            Some(slot) => Some(state.hasher.verify_in(slot, password.clone(), phc).await?),
        };
        match (user, verification) {
            (Some(user), Some(v)) if v.valid => Ok((user, v.needs_rehash)),
            _ => Err(AuthError::InvalidCredentials),
        }
    }
    .await;

    let (user, needs_rehash) = match result {
        Ok(found) => found,
        Err(AuthError::InvalidCredentials) => {
            let lock = state
                .sessions
                .record_login_failure(username, ip.as_deref(), now, lockout)
                .await;
            metrics
                .logins
                .with_label_values(&["invalid_credentials"])
                .inc();
            let mut event = AuditEvent::new("login", "failure").ip(client.ip);
            if username.len() <= MAX_USERNAME_LEN {
                event = event.username(username);
            }
            audit(state, event.clone()).await;
            if let Ok(Some(ms)) = lock {
                metrics.lockouts.with_label_values(&["username"]).inc();
                audit(
                    state,
                    AuditEvent {
                        kind: "lockout",
                        detail: serde_json::json!({ "lock_seconds": ms_to_seconds_ceil(ms) }),
                        ..event
                    },
                )
                .await;
            }
            return Err(AuthError::InvalidCredentials);
        }
        Err(e) => {
            let outcome = match &e {
                AuthError::Locked(_) => "locked",
                AuthError::Overloaded => "overloaded",
                AuthError::Store(_) => "unavailable",
                _ => "error",
            };
            metrics.logins.with_label_values(&[outcome]).inc();
            return Err(e);
        }
    };

    if let Err(e) = state.sessions.clear_login_failures(username).await {
        tracing::warn!(error = %e, "could not clear failed-login counter");
    }
    if needs_rehash {
        rehash_in_background(state, user.id, password);
    }
    let pair = start_session(state, &user, client).await?;
    metrics.logins.with_label_values(&["success"]).inc();
    audit(
        state,
        AuditEvent::new("login", "success")
            .user(user.id, &user.username)
            .ip(client.ip)
            .detail(serde_json::json!({ "session_id": pair.session_id })),
    )
    .await;
    Ok(pair)
}

/// Upgrades a stored hash to the configured parameters after a successful login.
fn rehash_in_background(state: &AppState, user_id: Uuid, password: SecretString) {
    let state = state.clone();
    tokio::spawn(async move {
        match state.hasher.hash(password).await {
            Ok(phc) => {
                if let Err(e) = state.db.replace_password_hash(user_id, &phc).await {
                    tracing::warn!(error = %e, "rehash not stored");
                }
            }
            Err(e) => tracing::debug!(error = %e, "rehash skipped"),
        }
    });
}

/// Creates a session for `user` and hands out its first token pair. The session is
/// stored (and replicated, see the session store) before this returns.
pub async fn start_session(
    state: &AppState,
    user: &User,
    client: &ClientInfo,
) -> Result<TokenPair, AuthError> {
    let policy = state.runtime.get();
    let now = now_ms();
    let session_id = Uuid::new_v4();
    let lifetime_ms = seconds_to_ms(
        policy
            .session_absolute_timeout_seconds
            .min(policy.refresh_token_ttl_seconds),
    );
    let session = Session {
        id: session_id,
        user_id: user.id,
        username: user.username.clone(),
        roles: user.roles.clone(),
        permissions: user.permissions.clone(),
        created_at: now,
        last_used_at: now,
        expires_at: now + lifetime_ms,
        client_ip: client.ip.map(|ip| ip.to_string()),
        user_agent: client.user_agent.clone(),
        generation: 0,
    };
    let refresh = RefreshToken::generate(user.id, session_id)
        .map_err(|_| AuthError::Internal("no randomness".into()))?;
    let idle_ms = seconds_to_ms(policy.session_idle_timeout_seconds);
    state
        .sessions
        .create(&session, &refresh.hash(), idle_ms)
        .await?;
    token_pair(state, &session, &refresh, now)
}

fn token_pair(
    state: &AppState,
    session: &Session,
    refresh: &RefreshToken,
    now: i64,
) -> Result<TokenPair, AuthError> {
    let policy = state.runtime.get();
    let (access_token, _) = state.tokens.issue(
        &Subject {
            user_id: session.user_id,
            session_id: session.id,
            username: &session.username,
            roles: &session.roles,
            permissions: &session.permissions,
        },
        policy.access_token_ttl_seconds,
    )?;
    let idle_ms = seconds_to_ms(policy.session_idle_timeout_seconds);
    Ok(TokenPair {
        access_token,
        token_type: "Bearer",
        expires_in: policy.access_token_ttl_seconds,
        refresh_token: refresh.to_wire().expose_secret().to_owned(),
        refresh_expires_in: ms_to_seconds_ceil(idle_ms.min(session.expires_at - now)),
        session_id: session.id,
    })
}

pub async fn refresh(
    state: &AppState,
    presented: &str,
    client: &ClientInfo,
) -> Result<TokenPair, AuthError> {
    let metrics = &state.metrics;
    let result = refresh_inner(state, presented, client).await;
    let outcome = match &result {
        Ok(_) => "success",
        Err(AuthError::InvalidToken) => "invalid",
        Err(AuthError::Store(_)) => "unavailable",
        Err(_) => "error",
    };
    metrics.refreshes.with_label_values(&[outcome]).inc();
    result
}

async fn refresh_inner(
    state: &AppState,
    presented: &str,
    client: &ClientInfo,
) -> Result<TokenPair, AuthError> {
    let token = RefreshToken::parse(presented).ok_or(AuthError::InvalidToken)?;
    let policy = state.runtime.get();
    let replacement = RefreshToken::generate(token.user_id, token.session_id)
        .map_err(|_| AuthError::Internal("no randomness".into()))?;
    let now = now_ms();
    let outcome = state
        .sessions
        .rotate_refresh(
            token.user_id,
            token.session_id,
            &token.hash(),
            &replacement.hash(),
            now,
            seconds_to_ms(policy.refresh_reuse_grace_seconds),
            seconds_to_ms(policy.session_idle_timeout_seconds),
        )
        .await?;
    let mut session = match outcome {
        RefreshOutcome::Rotated(s) | RefreshOutcome::Grace(s) => s,
        RefreshOutcome::Unknown => return Err(AuthError::InvalidToken),
        RefreshOutcome::Reused => {
            state.metrics.refresh_reuse.inc();
            tracing::warn!(user_id = %token.user_id, session_id = %token.session_id, "refresh token reuse: session revoked");
            let mut event = AuditEvent::new("refresh_reuse", "session_revoked")
                .ip(client.ip)
                .detail(serde_json::json!({ "session_id": token.session_id }));
            event.user_id = Some(token.user_id);
            audit(state, event).await;
            return Err(AuthError::InvalidToken);
        }
    };
    // Roles and the disabled flag come from the database when it answers; while it
    // is down, the session's snapshot keeps refresh working.
    match state.db.get_user(session.user_id).await {
        Ok(Some(user)) if !user.disabled => {
            if user.roles != session.roles
                || user.permissions != session.permissions
                || user.username != session.username
            {
                session.username = user.username;
                session.roles = user.roles;
                session.permissions = user.permissions;
                state.sessions.update_identity(&session).await?;
            }
        }
        Ok(_) => {
            state.sessions.revoke(session.user_id, session.id).await?;
            return Err(AuthError::InvalidToken);
        }
        Err(e) => {
            tracing::debug!(error = %e, "refresh uses the session's identity snapshot");
        }
    }
    token_pair(state, &session, &replacement, now)
}

/// When degraded validations were last logged (Unix ms), to log once per interval.
static LAST_DEGRADED_LOG: AtomicI64 = AtomicI64::new(0);
const DEGRADED_LOG_INTERVAL_MS: i64 = 10_000;

/// Verifies a token and its session; with `permission`, also that the token
/// grants it.
pub async fn validate(
    state: &AppState,
    token: &str,
    permission: Option<&str>,
) -> Result<Claims, AuthError> {
    let result = validate_inner(state, token, permission).await;
    let outcome = match &result {
        Ok(_) => "valid",
        Err(AuthError::InvalidToken) => "invalid",
        Err(AuthError::Forbidden(_)) => "forbidden",
        Err(AuthError::Store(_)) => "unavailable",
        Err(_) => "error",
    };
    state
        .metrics
        .validations
        .with_label_values(&[outcome])
        .inc();
    result
}

async fn validate_inner(
    state: &AppState,
    token: &str,
    permission: Option<&str>,
) -> Result<Claims, AuthError> {
    let claims = match state.tokens.verify(token) {
        Ok(claims) => claims,
        Err(TokenError::UnknownKey) => {
            // A key another replica just created, or garbage: reload, rate-limited.
            // Boxed, as the session check below: a rare path should not size
            // the future of every validation.
            if Box::pin(state.tokens.keys.reload_for_unknown_kid(&state.db)).await {
                state.tokens.verify(token)?
            } else {
                return Err(AuthError::InvalidToken);
            }
        }
        Err(e) => return Err(e.into()),
    };
    let (Some(user_id), Some(session_id)) = (claims.user_id(), claims.session_id()) else {
        return Err(AuthError::InvalidToken);
    };
    let idle_ms = seconds_to_ms(state.runtime.get().session_idle_timeout_seconds);
    // Boxed: the store's future is ~7 KiB (the Redis client's request state), and
    // inline it made this future, and every handler and layer future holding it,
    // that large; each was moved several times per request (memcpy was a fifth of
    // validation's instructions). One allocation is cheaper.
    match Box::pin(state.sessions.check(user_id, session_id, now_ms(), idle_ms)).await {
        Ok(true) => {}
        Ok(false) => return Err(AuthError::InvalidToken),
        Err(e) if e.is_unavailable() => match state.config.session_outage_policy {
            OutagePolicy::Strict => return Err(e.into()),
            OutagePolicy::Degraded => {
                state.metrics.degraded_validations.inc();
                let now = now_ms();
                let last = LAST_DEGRADED_LOG.load(Ordering::Relaxed);
                if now - last > DEGRADED_LOG_INTERVAL_MS
                    && LAST_DEGRADED_LOG
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!("session store unreachable: accepting tokens on signature and expiry alone (AUTH_SESSION_OUTAGE_POLICY=degraded)");
                }
            }
        },
        Err(e) => return Err(e.into()),
    }
    if let Some(p) = permission {
        if !claims.has_permission(p) {
            return Err(AuthError::Forbidden(p.to_owned()));
        }
    }
    Ok(claims)
}

fn ids(claims: &Claims) -> Result<(Uuid, Uuid), AuthError> {
    match (claims.user_id(), claims.session_id()) {
        (Some(u), Some(s)) => Ok((u, s)),
        _ => Err(AuthError::InvalidToken),
    }
}

pub async fn logout(
    state: &AppState,
    claims: &Claims,
    client: &ClientInfo,
) -> Result<(), AuthError> {
    let (user_id, session_id) = ids(claims)?;
    state.sessions.revoke(user_id, session_id).await?;
    audit(
        state,
        AuditEvent::new("logout", "success")
            .user(user_id, &claims.username)
            .ip(client.ip)
            .detail(serde_json::json!({ "session_id": session_id })),
    )
    .await;
    Ok(())
}

pub async fn logout_all(
    state: &AppState,
    claims: &Claims,
    client: &ClientInfo,
) -> Result<u64, AuthError> {
    let (user_id, _) = ids(claims)?;
    let n = state.sessions.revoke_all(user_id, None).await?;
    audit(
        state,
        AuditEvent::new("logout_all", "success")
            .user(user_id, &claims.username)
            .ip(client.ip)
            .detail(serde_json::json!({ "sessions": n })),
    )
    .await;
    Ok(n)
}

/// Creates an account, for registration and the admin API alike: the username and
/// email checked, the password checked against the policy and hashed, and the user
/// stored together with the audit event `audit` makes for the checked username.
pub async fn create_user(
    state: &AppState,
    username: &str,
    email: Option<&str>,
    password: SecretString,
    roles: Vec<String>,
    audit: impl FnOnce(&str) -> AuditEvent,
) -> Result<User, AuthError> {
    let username = users::validate_username(username)?;
    let email = users::validate_email(email)?;
    let password_hash = hash_new_password(state, password, &username, email.as_deref()).await?;
    let event = audit(&username);
    let user = NewUser {
        username,
        email,
        password_hash,
        roles,
    };
    Ok(state.db.create_user(&user, &event).await?)
}

/// Checks a new password against the policy and hashes it.
pub async fn hash_new_password(
    state: &AppState,
    password: SecretString,
    username: &str,
    email: Option<&str>,
) -> Result<String, AuthError> {
    let policy = state.runtime.get();
    passwords::check_policy(password.expose_secret(), username, email, &policy)
        .map_err(|v| AuthError::Invalid("password", v.0))?;
    Ok(state.hasher.hash(password).await?)
}

pub async fn change_password(
    state: &AppState,
    claims: &Claims,
    current: SecretString,
    new: SecretString,
    client: &ClientInfo,
) -> Result<(), AuthError> {
    let (user_id, session_id) = ids(claims)?;
    let credentials = state
        .db
        .find_credentials(&claims.username)
        .await?
        .filter(|c| c.user.id == user_id && !c.user.disabled)
        .ok_or(AuthError::InvalidToken)?;
    let verification = state
        .hasher
        .verify(current, Some(credentials.password_hash))
        .await?;
    if !verification.valid {
        audit(
            state,
            AuditEvent::new("password_change", "failure")
                .user(user_id, &claims.username)
                .ip(client.ip),
        )
        .await;
        return Err(AuthError::Invalid(
            "current_password",
            "is not correct".into(),
        ));
    }
    let user = credentials.user;
    let phc = hash_new_password(state, new, &user.username, user.email.as_deref()).await?;
    state
        .db
        .update_user(
            user_id,
            &UserUpdate {
                password_hash: Some(phc),
                ..UserUpdate::default()
            },
            &AuditEvent::new("password_change", "success")
                .user(user_id, &user.username)
                .ip(client.ip),
        )
        .await?;
    // Whoever else holds a session (perhaps whoever learned the old password)
    // is signed out; the caller keeps this one.
    state.sessions.revoke_all(user_id, Some(session_id)).await?;
    Ok(())
}

/// Ends every session of a user after an operator disabled, deleted or reset
/// them. The database change already happened; if Redis is down, refresh still
/// refuses the user (it re-reads the database) and access tokens run out soon.
pub async fn revoke_user_sessions(state: &AppState, user_id: Uuid) {
    if let Err(e) = state.sessions.revoke_all(user_id, None).await {
        tracing::error!(user_id = %user_id, error = %e, "could not revoke sessions; they end at refresh");
    }
}
