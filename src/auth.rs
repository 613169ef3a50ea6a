//! The authentication domain: login, refresh, validation, logout, password change,
//! and the account rules the admin API, the CLI and bootstrap share.
//!
//! Handlers call these with parsed input; these call the stores. Failure semantics
//! follow the contract's table: login needs PostgreSQL and the session store;
//! validation needs neither the database (keys are in memory) nor, under the
//! degraded outage policy and for gateways only, Redis; refresh falls back to the
//! session's identity snapshot while PostgreSQL is down.
//!
//! Changes of what a user may do (roles, a role's permissions, disabling, the
//! password) are in force at once: the store raises the user's authorization
//! version in the change's transaction, and [`publish_authz_versions`] copies it
//! to the session store, which every validation reads in the same round trip as
//! the session; tokens minted under an older version stop validating.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    app::AppState,
    config::OutagePolicy,
    passwords::{self, HashError},
    runtime_config::RuntimeConfig,
    sessions::{
        lockout_subject, Attempt, IpAdmission, LockoutPolicy, RefreshOutcome, Rotation, Session,
        SessionStore, AUTHZ_VERSION_TTL_MS,
    },
    store::{IdentityStore, StoreError},
    tokens::{Claims, Subject, TokenError},
    users::{
        self, AuditEvent, AuditQuery, AuthzVersion, FieldError, NewUser, Redacted, Role,
        RoleUpdate, StoredAuditEvent, User, UserUpdate,
    },
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
#[derive(Serialize, ToSchema)]
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

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPair")
            .field("access_token", &Redacted)
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("refresh_token", &Redacted)
            .field("refresh_expires_in", &self.refresh_expires_in)
            .field("session_id", &self.session_id)
            .finish()
    }
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

/// A name as an audit event records it: whole when it could be a username,
/// otherwise cut short, so a flood of long names cannot fill the audit table.
fn audited_name(username: &str) -> String {
    const MAX: usize = 64;
    match username.char_indices().nth(MAX) {
        None => username.to_owned(),
        Some((end, _)) => format!("{}…", &username[..end]),
    }
}

fn lockout_policy(policy: &RuntimeConfig) -> LockoutPolicy {
    LockoutPolicy {
        threshold: policy.lockout_threshold,
        window_ms: seconds_to_ms(policy.lockout_window_seconds),
        ip_limit: policy.failed_logins_per_ip_per_minute,
    }
}

/// Lets an attempt of a client IP go ahead, after its turn in the IP's slow lane
/// once the IP is over its failure limit, or refuses it (429) when the lane is
/// full. Over the limit the IP is slowed to its average allowed rate rather than
/// shut out: many users share one address behind a NAT or a proxy that is not
/// in AUTH_TRUSTED_PROXIES, and an attacker among them must not lock them all out
/// of a correct password; yet guessing from that address gets no faster.
async fn admit_ip(state: &AppState, ip: &str, lockout: LockoutPolicy) -> Result<(), AuthError> {
    match state.sessions.ip_admission(ip, now_ms(), lockout).await? {
        IpAdmission::Now => Ok(()),
        IpAdmission::After(0) => Ok(()),
        IpAdmission::After(wait_ms) => {
            // A waiting attempt holds a request slot: only so many may wait.
            let Ok(_place) = state.slow_lane.try_acquire() else {
                state.metrics.lockouts.with_label_values(&["ip"]).inc();
                return Err(AuthError::Locked(ms_to_seconds_ceil(wait_ms)));
            };
            state.metrics.ip_slowed.inc();
            tokio::time::sleep(Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0))).await;
            Ok(())
        }
        IpAdmission::Refused(retry_ms) => {
            state.metrics.lockouts.with_label_values(&["ip"]).inc();
            Err(AuthError::Locked(ms_to_seconds_ceil(retry_ms)))
        }
    }
}

/// Counts a failure of the client IP; a failure to count is logged, not fatal
/// (the request already failed for its own reason).
async fn record_ip_failure(state: &AppState, ip: Option<&str>) {
    if let Some(ip) = ip {
        if let Err(e) = state.sessions.record_ip_failure(ip, now_ms()).await {
            tracing::warn!(error = %e, "failed attempt of a client IP not counted");
        }
    }
}

/// Reserves one password attempt for `subject` (see
/// `SessionStore::reserve_attempt`): the lockout it started, if any, or `Locked`.
async fn reserve_attempt(
    state: &AppState,
    subject: &str,
    lockout: LockoutPolicy,
) -> Result<Option<i64>, AuthError> {
    match state
        .sessions
        .reserve_attempt(subject, now_ms(), lockout)
        .await?
    {
        Attempt::Locked { retry_ms } => Err(AuthError::Locked(ms_to_seconds_ceil(retry_ms))),
        Attempt::Admitted { lock_ms } => Ok(lock_ms),
    }
}

/// Records a wrong password: its audit event and, when the attempt started a
/// lockout, the lockout's too.
async fn audit_wrong_password(state: &AppState, event: AuditEvent, lock_started: Option<i64>) {
    audit(state, event.clone()).await;
    if let Some(ms) = lock_started {
        state
            .metrics
            .lockouts
            .with_label_values(&["username"])
            .inc();
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
}

pub async fn login(
    state: &AppState,
    username: &str,
    password: SecretString,
    client: &ClientInfo,
) -> Result<TokenPair, AuthError> {
    let policy = state.runtime.get();
    let metrics = &state.metrics;
    let ip = client.ip.map(|ip| ip.to_string());
    let lockout = lockout_policy(&policy);
    // The lockout this attempt started, if it was the one to reach the threshold.
    let mut lock_started = None;
    // The account the name resolved to, for the audit trail of a failure.
    let mut account = None;

    let result = async {
        if let Some(ip) = &ip {
            admit_ip(state, ip, lockout).await?;
        }
        // Usernames are ASCII and compared case-insensitively, one way everywhere
        // (see `users::login_name`). A name that breaks the rules cannot exist:
        // refused without a lookup, a hash or a counter of its own.
        let Some(name) = users::login_name(username) else {
            return Err(AuthError::InvalidCredentials);
        };
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
        let credentials = state.db.find_credentials(&name).await?;
        account = credentials.as_ref().map(|c| c.user.id);
        // Counted under the account, so every spelling of its name shares one
        // budget; reserved before the hash is checked, so concurrent attempts
        // cannot all pass a check that none of them has failed yet.
        let subject = lockout_subject(account, &name);
        lock_started = reserve_attempt(state, &subject, lockout).await?;
        let (user, phc) = match credentials {
            Some(c) if !c.user.disabled => (Some(c.user), Some(c.password_hash)),
            _ => (None, None),
        };
        let verification = match slot {
            None => None,
            Some(slot) => Some(
                state
                    .hasher
                    .verify_in(slot, password.clone(), phc.clone())
                    .await?,
            ),
        };
        match (user, phc, verification) {
            (Some(user), Some(phc), Some(v)) if v.valid => {
                if let Err(e) = state.sessions.clear_login_failures(&subject).await {
                    tracing::warn!(error = %e, "could not clear failed-login counter");
                }
                Ok((user, phc, v.needs_rehash))
            }
            _ => Err(AuthError::InvalidCredentials),
        }
    }
    .await;

    let (user, phc, needs_rehash) = match result {
        Ok(found) => found,
        Err(AuthError::InvalidCredentials) => {
            record_ip_failure(state, ip.as_deref()).await;
            metrics
                .logins
                .with_label_values(&["invalid_credentials"])
                .inc();
            let mut event = AuditEvent::new("login", "failure")
                .ip(client.ip)
                .username(audited_name(username));
            event.user_id = account;
            audit_wrong_password(state, event, lock_started).await;
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

    if needs_rehash {
        rehash_in_background(state, user.id, phc, password);
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

/// Upgrades a stored hash to the configured parameters after a successful login,
/// only over the hash that was verified: a password changed meanwhile stays.
fn rehash_in_background(state: &AppState, user_id: Uuid, verified: String, password: SecretString) {
    let state = state.clone();
    tokio::spawn(async move {
        match state.hasher.hash(password).await {
            Ok(phc) => match state
                .db
                .replace_password_hash(user_id, &verified, &phc)
                .await
            {
                Ok(true) => {}
                Ok(false) => tracing::debug!("rehash dropped: the password changed meanwhile"),
                Err(e) => tracing::warn!(error = %e, "rehash not stored"),
            },
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
        authz_version: user.authz_version,
        password_epoch: Some(user.password_changed_at.timestamp_micros()),
        created_at: now,
        last_used_at: now,
        expires_at: now + lifetime_ms,
        client_ip: client.ip.map(|ip| ip.to_string()),
        user_agent: client.user_agent.clone(),
        generation: 0,
    };
    let refresh = state
        .refresh_tokens
        .generate(user.id, session_id)
        .map_err(|_| AuthError::Internal("no randomness".into()))?;
    let idle_ms = seconds_to_ms(policy.session_idle_timeout_seconds);
    let ended = state
        .sessions
        .create(
            &session,
            &refresh.hash(),
            idle_ms,
            policy.max_sessions_per_user,
        )
        .await?;
    if ended > 0 {
        tracing::debug!(user_id = %user.id, ended, "oldest sessions ended: the user reached max_sessions_per_user");
    }
    token_pair(state, &session, &refresh, now)
}

fn token_pair(
    state: &AppState,
    session: &Session,
    refresh: &crate::tokens::refresh::RefreshToken,
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
            authz_version: session.authz_version,
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
    let (token, authentic) = state
        .refresh_tokens
        .parse(presented)
        .ok_or(AuthError::InvalidToken)?;
    let policy = state.runtime.get();
    let replacement = state
        .refresh_tokens
        .generate(token.user_id, token.session_id)
        .map_err(|_| AuthError::Internal("no randomness".into()))?;
    let now = now_ms();
    let outcome = state
        .sessions
        .rotate_refresh(
            token.user_id,
            token.session_id,
            &Rotation {
                presented_hash: &token.hash(),
                authentic,
                replacement_hash: &replacement.hash(),
                now_ms: now,
                grace_ms: seconds_to_ms(policy.refresh_reuse_grace_seconds),
                idle_ms: seconds_to_ms(policy.session_idle_timeout_seconds),
            },
        )
        .await?;
    let (mut session, current_version) = match outcome {
        RefreshOutcome::Rotated {
            session,
            authz_version,
        }
        | RefreshOutcome::Grace {
            session,
            authz_version,
        } => (session, authz_version),
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
    // Roles, the disabled flag and the password come from the database when it
    // answers; while it is down, the session's snapshot keeps refresh working,
    // unless the user's privileges changed after the snapshot was taken.
    match state.db.get_user(session.user_id).await {
        Ok(Some(user)) if !user.disabled => {
            if session.predates_password_change(user.password_changed_at.timestamp_micros()) {
                // A reset or change whose revocations did not reach this session
                // (the session store failed after the commit, or a login raced it).
                state.sessions.revoke(session.user_id, session.id).await?;
                return Err(AuthError::InvalidToken);
            }
            if user.authz_version != session.authz_version
                || user.roles != session.roles
                || user.permissions != session.permissions
                || user.username != session.username
            {
                session.username = user.username;
                session.roles = user.roles;
                session.permissions = user.permissions;
                session.authz_version = user.authz_version;
                state.sessions.update_identity(&session).await?;
            }
            if user.authz_version > current_version {
                // A change whose publication failed: this refresh publishes it.
                publish_authz_versions(
                    state,
                    vec![AuthzVersion {
                        user_id: session.user_id,
                        version: user.authz_version,
                    }],
                )
                .await;
            }
        }
        Ok(_) => {
            state.sessions.revoke(session.user_id, session.id).await?;
            return Err(AuthError::InvalidToken);
        }
        Err(e) if e.is_unavailable() => {
            if session.authz_version < current_version {
                // The snapshot is older than a change of the user's privileges:
                // a token from it would not validate. Retry once the database is back.
                return Err(e.into());
            }
            tracing::debug!(error = %e, "refresh uses the session's identity snapshot");
        }
        Err(e) => return Err(e.into()),
    }
    token_pair(state, &session, &replacement, now)
}

/// When degraded validations were last logged (Unix ms), to log once per interval.
static LAST_DEGRADED_LOG: AtomicI64 = AtomicI64::new(0);
const DEGRADED_LOG_INTERVAL_MS: i64 = 10_000;

/// How a validation treats a session store it cannot reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unchecked {
    /// As `AUTH_SESSION_OUTAGE_POLICY` says (gateways and apps validating tokens).
    PerPolicy,
    /// Never accepted: the route acts on the session (the admin API, logout,
    /// password change), so an unchecked token must not pass on its signature.
    Refused,
}

/// Verifies a token and its session for apps and gateways (`/v1/auth/validate`,
/// forward-auth); with `permission`, also that the token grants it. Under the
/// degraded outage policy a token whose session cannot be checked passes.
pub async fn validate(
    state: &AppState,
    token: &str,
    permission: Option<&str>,
) -> Result<Claims, AuthError> {
    validate_counted(state, token, permission, Unchecked::PerPolicy).await
}

/// Verifies a token and its session for a route of the service itself: the
/// session must be checked (503 while the session store is unreachable,
/// whatever the outage policy).
pub async fn authenticate(
    state: &AppState,
    token: &str,
    permission: Option<&str>,
) -> Result<Claims, AuthError> {
    validate_counted(state, token, permission, Unchecked::Refused).await
}

async fn validate_counted(
    state: &AppState,
    token: &str,
    permission: Option<&str>,
    unchecked: Unchecked,
) -> Result<Claims, AuthError> {
    let result = validate_inner(state, token, permission, unchecked).await;
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
    unchecked: Unchecked,
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
    let (user_id, session_id) = ids(&claims)?;
    let idle_ms = seconds_to_ms(state.runtime.get().session_idle_timeout_seconds);
    // Boxed: the store's future is ~7 KiB (the Redis client's request state), and
    // inline it made this future, and every handler and layer future holding it,
    // that large; each was moved several times per request (memcpy was a fifth of
    // validation's instructions). One allocation is cheaper.
    match Box::pin(state.sessions.check(user_id, session_id, now_ms(), idle_ms)).await {
        // Minted before the user's privileges last changed: refused, and the next
        // refresh carries what is in force now.
        Ok(Some(version)) if claims.authz_ver.unwrap_or(0) < version => {
            return Err(AuthError::InvalidToken)
        }
        Ok(Some(_)) => {}
        Ok(None) => return Err(AuthError::InvalidToken),
        // Only Redis being unreachable is an outage the policy governs: the
        // embedded store's errors (a busy lock) are this process's own.
        Err(e)
            if e.is_unavailable()
                && state.sessions.is_networked()
                && unchecked == Unchecked::PerPolicy
                && state.config.session_outage_policy == OutagePolicy::Degraded =>
        {
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

/// Creates an account, for registration, the admin API, the CLI and bootstrap
/// alike: the username and email checked, the password checked against the
/// policy and hashed, the role names checked, and the user stored together with
/// the audit event `audit` makes for the checked username and roles.
pub async fn create_user(
    state: &AppState,
    username: &str,
    email: Option<&str>,
    password: SecretString,
    roles: Vec<String>,
    audit: impl FnOnce(&str, &[String]) -> AuditEvent,
) -> Result<User, AuthError> {
    let username = users::validate_username(username)?;
    let email = users::validate_email(email)?;
    let roles = users::validate_names("roles", &roles)?;
    let password_hash = hash_new_password(state, password, &username, email.as_deref()).await?;
    let event = audit(&username, &roles);
    let user = NewUser {
        username,
        email,
        password_hash,
        roles,
    };
    Ok(state.db.create_user(&user, &event).await?)
}

/// Registration: as [`create_user`], with what an anonymous caller may learn
/// bounded. A taken username or email answers 409 (the caller must be told why
/// the account was not made), and each such answer counts as a failure of the
/// client IP, so probing for taken names is slowed like guessing passwords
/// (see [`admit_ip`]).
pub async fn register(
    state: &AppState,
    username: &str,
    email: Option<&str>,
    password: SecretString,
    client: &ClientInfo,
) -> Result<User, AuthError> {
    let ip = client.ip.map(|ip| ip.to_string());
    if let Some(ip) = &ip {
        admit_ip(state, ip, lockout_policy(&state.runtime.get())).await?;
    }
    let created = create_user(
        state,
        username,
        email,
        password,
        Vec::new(),
        |username, _| {
            AuditEvent::new("register", "success")
                .username(username)
                .ip(client.ip)
        },
    )
    .await;
    if let Err(AuthError::Store(StoreError::Conflict(_))) = &created {
        record_ip_failure(state, ip.as_deref()).await;
    }
    created
}

/// Creates the first administrator, with the rules of every account, when no
/// user exists; None when one does (another replica was first).
pub async fn create_first_admin(
    state: &AppState,
    username: &str,
    password: SecretString,
) -> Result<Option<User>, AuthError> {
    let username = users::validate_username(username)?;
    let password_hash = hash_new_password(state, password, &username, None).await?;
    let role = users::admin_role();
    Ok(state
        .db
        .create_first_user(
            &NewUser {
                username: username.clone(),
                email: None,
                password_hash,
                roles: Vec::new(),
            },
            &role,
            &AuditEvent::new("bootstrap_admin", "success").username(&username),
        )
        .await?)
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
    // A guess of the current password is a failed login: counted with the
    // lockout, and refused while the account is locked, so a stolen access
    // token does not give unlimited guesses.
    let subject = lockout_subject(Some(user_id), "");
    let lockout = lockout_policy(&state.runtime.get());
    let lock_started = reserve_attempt(state, &subject, lockout).await?;
    let verification = state
        .hasher
        .verify(current, Some(credentials.password_hash))
        .await?;
    if !verification.valid {
        let event = AuditEvent::new("password_change", "failure")
            .user(user_id, &claims.username)
            .ip(client.ip);
        audit_wrong_password(state, event, lock_started).await;
        return Err(AuthError::Invalid(
            "current_password",
            "is not correct".into(),
        ));
    }
    if let Err(e) = state.sessions.clear_login_failures(&subject).await {
        tracing::warn!(error = %e, "could not clear failed-login counter");
    }
    let user = credentials.user;
    let phc = hash_new_password(state, new, &user.username, user.email.as_deref()).await?;
    let user = state
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
    // is signed out; the caller keeps this one, under the new password.
    end_sessions_after_commit(state, user_id, Some(session_id)).await;
    if let Err(e) = state
        .sessions
        .set_password_epoch(
            user_id,
            session_id,
            user.password_changed_at.timestamp_micros(),
        )
        .await
    {
        tracing::warn!(error = %e, "the caller's session ends at its next refresh");
    }
    publish_authz_versions(
        state,
        vec![AuthzVersion {
            user_id,
            version: user.authz_version,
        }],
    )
    .await;
    Ok(())
}

/// Ends the user's sessions (but `except`) after a committed change. If the
/// session store fails, the change still holds: refresh refuses sessions older
/// than a password change or of a disabled user, and the raised authorization
/// version refuses their access tokens.
async fn end_sessions_after_commit(state: &AppState, user_id: Uuid, except: Option<Uuid>) {
    if let Err(e) = state.sessions.revoke_all(user_id, except).await {
        tracing::error!(user_id = %user_id, error = %e, "could not revoke sessions; refresh and validation refuse them");
    }
}

/// Copies raised authorization versions to the session store, where every
/// validation reads them: once this returns (normally within milliseconds of the
/// commit), every replica refuses the tokens minted before the change. Versions
/// the store did not take are retried in the background for as long as a token
/// could live, and each user's next refresh publishes them too.
pub async fn publish_authz_versions(state: &AppState, versions: Vec<AuthzVersion>) {
    /// Writes in flight at once, for a role held by many users.
    const CONCURRENCY: usize = 32;
    let mut failed = Vec::new();
    for chunk in versions.chunks(CONCURRENCY) {
        let mut writes = tokio::task::JoinSet::new();
        for v in chunk.iter().copied() {
            let state = state.clone();
            writes.spawn(async move {
                let result = state
                    .sessions
                    .set_authz_version(v.user_id, v.version, now_ms())
                    .await;
                (v, result)
            });
        }
        while let Some(joined) = writes.join_next().await {
            match joined {
                Ok((_, Ok(()))) => {}
                Ok((v, Err(e))) => {
                    tracing::warn!(user_id = %v.user_id, error = %e, "authorization version not published yet; retrying");
                    failed.push(v);
                }
                Err(e) => {
                    tracing::error!(error = %e, "publishing an authorization version panicked")
                }
            }
        }
    }
    if failed.is_empty() {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let give_up = tokio::time::Instant::now()
            + Duration::from_millis(u64::try_from(AUTHZ_VERSION_TTL_MS).unwrap_or(0));
        let mut backoff = Duration::from_millis(200);
        while !failed.is_empty() && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            let mut still = Vec::new();
            for v in failed {
                if state
                    .sessions
                    .set_authz_version(v.user_id, v.version, now_ms())
                    .await
                    .is_err()
                {
                    still.push(v);
                }
            }
            failed = still;
        }
    });
}

/// What an administrator may change about a user; `None` leaves a field alone.
#[derive(Default)]
pub struct UserChanges {
    /// `Some(None)` clears the email.
    pub email: Option<Option<String>>,
    pub disabled: Option<bool>,
    pub roles: Option<Vec<String>>,
    /// Resets the password; ends the user's sessions.
    pub password: Option<SecretString>,
}

/// An administrator's change of a user: checked as every account is, stored with
/// its audit event, then in force at once (see the module doc). Disabling or
/// resetting ends the user's sessions. Refused with `LastAdmin` when it would
/// leave no administrator.
pub async fn update_user(
    state: &AppState,
    admin: &Claims,
    client: &ClientInfo,
    id: Uuid,
    changes: UserChanges,
) -> Result<User, AuthError> {
    let existing = state.db.get_user(id).await?.ok_or(StoreError::NotFound)?;
    let email = changes
        .email
        .map(|e| users::validate_email(e.as_deref()))
        .transpose()?;
    let roles = changes
        .roles
        .as_deref()
        .map(|r| users::validate_names("roles", r))
        .transpose()?;
    let reset = changes.password.is_some();
    let password_hash = match changes.password {
        None => None,
        Some(p) => {
            let email_now = email.clone().unwrap_or(existing.email.clone());
            Some(hash_new_password(state, p, &existing.username, email_now.as_deref()).await?)
        }
    };
    let event = admin_event(
        "admin_user_update",
        admin,
        client,
        serde_json::json!({
            "target": existing.username, "target_id": id, "disabled": changes.disabled,
            "roles": roles, "email_changed": email.is_some(), "password_reset": reset,
        }),
    );
    let user = state
        .db
        .update_user(
            id,
            &UserUpdate {
                email,
                disabled: changes.disabled,
                roles,
                password_hash,
            },
            &event,
        )
        .await?;
    if changes.disabled == Some(true) || reset {
        end_sessions_after_commit(state, id, None).await;
    }
    if user.authz_version != existing.authz_version {
        publish_authz_versions(
            state,
            vec![AuthzVersion {
                user_id: id,
                version: user.authz_version,
            }],
        )
        .await;
    }
    Ok(user)
}

/// Deletes a user and ends their sessions; refused with `LastAdmin` when it
/// would leave no administrator.
pub async fn delete_user(
    state: &AppState,
    admin: &Claims,
    client: &ClientInfo,
    id: Uuid,
) -> Result<(), AuthError> {
    let event = admin_event(
        "admin_user_delete",
        admin,
        client,
        serde_json::json!({ "target_id": id }),
    );
    state.db.delete_user(id, &event).await?;
    end_sessions_after_commit(state, id, None).await;
    Ok(())
}

/// Changes a role; a change of its permissions is in force at once for every
/// holder. Refused with `LastAdmin` when it would leave no administrator.
pub async fn update_role(
    state: &AppState,
    admin: &Claims,
    client: &ClientInfo,
    name: &str,
    description: Option<String>,
    permissions: Option<Vec<String>>,
) -> Result<Role, AuthError> {
    let permissions = permissions
        .as_deref()
        .map(|p| users::validate_names("permissions", p))
        .transpose()?;
    if let Some(d) = &description {
        users::validate_description(d)?;
    }
    let event = admin_event(
        "admin_role_update",
        admin,
        client,
        serde_json::json!({ "role": name, "permissions": permissions }),
    );
    let (role, bumped) = state
        .db
        .update_role(
            name,
            &RoleUpdate {
                description,
                permissions,
            },
            &event,
        )
        .await?;
    publish_authz_versions(state, bumped).await;
    Ok(role)
}

/// Deletes a role; its holders lose what it granted at once. Refused with
/// `LastAdmin` when it would leave no administrator.
pub async fn delete_role(
    state: &AppState,
    admin: &Claims,
    client: &ClientInfo,
    name: &str,
) -> Result<(), AuthError> {
    let event = admin_event(
        "admin_role_delete",
        admin,
        client,
        serde_json::json!({ "role": name }),
    );
    let bumped = state.db.delete_role(name, &event).await?;
    publish_authz_versions(state, bumped).await;
    Ok(())
}

/// The audit event of an administrator's action.
pub fn admin_event(
    kind: &'static str,
    admin: &Claims,
    client: &ClientInfo,
    detail: serde_json::Value,
) -> AuditEvent {
    let mut event = AuditEvent::new(kind, "success")
        .ip(client.ip)
        .detail(detail);
    event.user_id = admin.user_id();
    event.username = Some(admin.username.clone());
    event
}

/// A page of audit events, newest first, and the cursor of the next page.
pub async fn audit_page(
    state: &AppState,
    mut query: AuditQuery,
) -> Result<(Vec<StoredAuditEvent>, Option<String>), AuthError> {
    let limit = query.limit;
    // One more than asked tells whether there is a next page.
    query.limit = limit.saturating_add(1);
    let mut events = state.db.audit_events(&query).await?;
    let more = events.len() > limit as usize;
    events.truncate(limit as usize);
    let cursor = more
        .then(|| events.last().map(|e| e.id.to_string()))
        .flatten();
    Ok((events, cursor))
}

/// Audit events are deleted in batches of this many, each its own transaction.
const AUDIT_PRUNE_BATCH: u32 = 1000;

/// Deletes audit events older than `audit_retention_days`, in batches, unless
/// another replica is at it (then this one stops); returns how many it deleted.
pub async fn prune_audit(state: &AppState) -> Result<u64, AuthError> {
    let days = i64::try_from(state.runtime.get().audit_retention_days).unwrap_or(i64::MAX / 2);
    let before = chrono::Utc::now() - chrono::Duration::days(days.min(3650));
    let mut total = 0;
    while let Some(deleted) = state.db.prune_audit(before, AUDIT_PRUNE_BATCH).await? {
        total += deleted;
        if deleted < u64::from(AUDIT_PRUNE_BATCH) {
            break;
        }
    }
    Ok(total)
}
