//! The storage interface for users, roles, runtime configuration, audit events and
//! signing keys, implemented by [`super::postgres`] and [`super::sqlite`], and by
//! [`super::Database`], which picks the configured backend and guards the call.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreError;
use crate::users::{
    AuditEvent, AuditQuery, AuthzVersion, Credentials, NewUser, Role, RoleUpdate, StoredAuditEvent,
    User, UserPage, UserUpdate,
};

/// A signing key as stored: the private half encrypted under the key-encryption key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub kid: String,
    /// `EdDSA` or `ES256`.
    pub algorithm: String,
    /// Public key: raw 32 bytes for Ed25519, uncompressed SEC1 point for P-256.
    pub public_key: Vec<u8>,
    /// nonce || AES-256-GCM ciphertext of the PKCS#8 private key.
    pub private_key_encrypted: Vec<u8>,
    pub created_at: DateTime<Utc>,
    /// When it starts signing; before that it is only published.
    pub activates_at: DateTime<Utc>,
}

/// Users, roles, configuration, audit and keys. Every mutation that an operator
/// makes takes the audit event and writes it in the same transaction, so a change
/// and its record commit together or not at all.
///
/// Errors: `NotFound` for a missing user/role, `Conflict` for a duplicate username
/// (any letter case), email or role name, `Invalid` for a reference to a role that
/// does not exist, `LastAdmin` for a change (of a user's roles or disabled flag,
/// a deletion, a role's permissions or its deletion) that would leave no enabled
/// user with the admin permission where there was one: checked in the change's
/// transaction, serialized with every other such change.
///
/// Every change of what a user may do (roles, a role's permissions, the disabled
/// flag, the password) raises the user's `authz_version` in the same transaction,
/// and the change returns the new versions, for the session store (see
/// `SessionStore::set_authz_version`).
#[allow(async_fn_in_trait)] // used with concrete types only, never as dyn
pub trait IdentityStore {
    async fn create_user(&self, user: &NewUser, audit: &AuditEvent) -> Result<User, StoreError>;
    async fn get_user(&self, id: Uuid) -> Result<Option<User>, StoreError>;
    /// Lookup by username, folding ASCII letters only (usernames are ASCII), the
    /// same way whatever the database's locale.
    async fn find_credentials(&self, username: &str) -> Result<Option<Credentials>, StoreError>;
    /// Users ordered by lower-cased username, after `cursor` (exclusive), whose
    /// username contains `filter` (case-insensitive).
    async fn list_users(
        &self,
        filter: Option<&str>,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<UserPage, StoreError>;
    /// Applies the update; a new password hash also sets `password_changed_at`.
    /// The returned user carries the new `authz_version`.
    async fn update_user(
        &self,
        id: Uuid,
        update: &UserUpdate,
        audit: &AuditEvent,
    ) -> Result<User, StoreError>;
    async fn delete_user(&self, id: Uuid, audit: &AuditEvent) -> Result<(), StoreError>;
    /// Replaces the hash after a parameter change (rehash on login), only if the
    /// stored hash is still `expected` (a password changed meanwhile stays);
    /// leaves `password_changed_at` alone. Returns whether it replaced it.
    async fn replace_password_hash(
        &self,
        id: Uuid,
        expected: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError>;
    /// Creates `user` (and `role` if missing, giving it to the user) only when no
    /// user exists at all. Exactly one of several replicas starting at once wins;
    /// the others get `Ok(None)`.
    async fn create_first_user(
        &self,
        user: &NewUser,
        role: &Role,
        audit: &AuditEvent,
    ) -> Result<Option<User>, StoreError>;
    async fn count_users(&self) -> Result<i64, StoreError>;

    async fn list_roles(&self) -> Result<Vec<Role>, StoreError>;
    async fn get_role(&self, name: &str) -> Result<Option<Role>, StoreError>;
    async fn create_role(&self, role: &Role, audit: &AuditEvent) -> Result<Role, StoreError>;
    /// Returns the role and, when its permissions changed, the new authorization
    /// versions of its holders.
    async fn update_role(
        &self,
        name: &str,
        update: &RoleUpdate,
        audit: &AuditEvent,
    ) -> Result<(Role, Vec<AuthzVersion>), StoreError>;
    /// Returns the new authorization versions of the role's former holders.
    async fn delete_role(
        &self,
        name: &str,
        audit: &AuditEvent,
    ) -> Result<Vec<AuthzVersion>, StoreError>;

    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError>;
    /// The events `query` selects, newest first (by id).
    async fn audit_events(&self, query: &AuditQuery) -> Result<Vec<StoredAuditEvent>, StoreError>;
    /// Deletes up to `batch` of the oldest events from before `before`; None when
    /// another replica is pruning now (PostgreSQL: one at a time).
    async fn prune_audit(
        &self,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<Option<u64>, StoreError>;

    /// Every stored configuration entry.
    async fn load_configuration(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError>;
    /// A cheap value that changes whenever any entry changes (count and newest
    /// `last_modified`), polled by every replica.
    async fn configuration_version(&self) -> Result<String, StoreError>;
    async fn set_configuration(
        &self,
        key: &str,
        value: &serde_json::Value,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// All keys, oldest activation first.
    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError>;
    /// Inserts `key` only if the newest stored key (by activation) is still
    /// `expected_newest` (None: no key at all), under a lock so that of several
    /// replicas rotating at once exactly one succeeds. Returns whether it did.
    async fn add_signing_key(
        &self,
        key: &StoredKey,
        expected_newest: Option<&str>,
    ) -> Result<bool, StoreError>;
    async fn delete_signing_keys(&self, kids: &[String]) -> Result<(), StoreError>;
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("private_key_encrypted", &crate::users::Redacted)
            .field("created_at", &self.created_at)
            .field("activates_at", &self.activates_at)
            .finish_non_exhaustive()
    }
}
