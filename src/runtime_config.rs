//! Runtime policy: token lifetimes, lockout, password rules, registration.
//!
//! Stored in the `configuration` table and editable through the admin API. Every
//! replica polls a cheap version (row count + newest `last_modified`) each second
//! and reloads on change, so a change made on one replica is in force on all of
//! them within the contract's 5 s. Readers get an `Arc` snapshot without locking
//! across an await.

use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::store::{Database, IdentityStore, StoreError};

/// The policy in force; every field has the contract's default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeConfig {
    pub access_token_ttl_seconds: u64,
    pub refresh_token_ttl_seconds: u64,
    pub session_idle_timeout_seconds: u64,
    pub session_absolute_timeout_seconds: u64,
    pub refresh_reuse_grace_seconds: u64,
    pub lockout_threshold: u64,
    pub lockout_window_seconds: u64,
    pub failed_logins_per_ip_per_minute: u64,
    pub password_min_length: u64,
    pub password_max_length: u64,
    pub password_min_score: u8,
    pub registration_enabled: bool,
    pub key_rotation_days: u64,
    /// Sessions one user may hold; a login beyond it ends the oldest, which keeps
    /// "end every session of the user" bounded.
    pub max_sessions_per_user: u64,
    pub audit_retention_days: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            access_token_ttl_seconds: 900,
            refresh_token_ttl_seconds: 604_800,
            session_idle_timeout_seconds: 3600,
            session_absolute_timeout_seconds: 604_800,
            refresh_reuse_grace_seconds: 0,
            lockout_threshold: 5,
            lockout_window_seconds: 900,
            failed_logins_per_ip_per_minute: 30,
            password_min_length: 12,
            password_max_length: 128,
            password_min_score: 2,
            registration_enabled: false,
            key_rotation_days: 30,
            max_sessions_per_user: 100,
            audit_retention_days: 90,
        }
    }
}

/// Why a value was refused; the text is safe to show an operator.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigValueError {
    #[error("unknown configuration key {0:?}")]
    UnknownKey(String),
    #[error("{key} must be {expected}")]
    Invalid { key: String, expected: String },
}

impl RuntimeConfig {
    /// The keys operators can set.
    pub const KEYS: [&'static str; 15] = [
        "access_token_ttl_seconds",
        "refresh_token_ttl_seconds",
        "session_idle_timeout_seconds",
        "session_absolute_timeout_seconds",
        "refresh_reuse_grace_seconds",
        "lockout_threshold",
        "lockout_window_seconds",
        "failed_logins_per_ip_per_minute",
        "password_min_length",
        "password_max_length",
        "password_min_score",
        "registration_enabled",
        "key_rotation_days",
        "max_sessions_per_user",
        "audit_retention_days",
    ];

    /// Sets one key after checking its type and range.
    pub fn set(&mut self, key: &str, value: &Value) -> Result<(), ConfigValueError> {
        fn int(key: &str, value: &Value, min: u64, max: u64) -> Result<u64, ConfigValueError> {
            value
                .as_u64()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| ConfigValueError::Invalid {
                    key: key.to_owned(),
                    expected: format!("a whole number from {min} to {max}"),
                })
        }
        const DAY: u64 = 86_400;
        const YEAR: u64 = 366 * DAY;
        match key {
            "access_token_ttl_seconds" => self.access_token_ttl_seconds = int(key, value, 1, DAY)?,
            "refresh_token_ttl_seconds" => {
                self.refresh_token_ttl_seconds = int(key, value, 1, YEAR)?
            }
            "session_idle_timeout_seconds" => {
                self.session_idle_timeout_seconds = int(key, value, 1, YEAR)?
            }
            "session_absolute_timeout_seconds" => {
                self.session_absolute_timeout_seconds = int(key, value, 1, YEAR)?
            }
            "refresh_reuse_grace_seconds" => {
                self.refresh_reuse_grace_seconds = int(key, value, 0, 300)?
            }
            "lockout_threshold" => self.lockout_threshold = int(key, value, 1, 1000)?,
            "lockout_window_seconds" => self.lockout_window_seconds = int(key, value, 1, DAY)?,
            "failed_logins_per_ip_per_minute" => {
                self.failed_logins_per_ip_per_minute = int(key, value, 1, 1_000_000)?
            }
            "password_min_length" => {
                self.password_min_length = int(key, value, 1, self.password_max_length)?
            }
            "password_max_length" => {
                self.password_max_length = int(key, value, self.password_min_length.max(8), 1024)?
            }
            "password_min_score" => {
                self.password_min_score = u8::try_from(int(key, value, 0, 4)?).unwrap_or(4)
            }
            "registration_enabled" => {
                self.registration_enabled =
                    value.as_bool().ok_or_else(|| ConfigValueError::Invalid {
                        key: key.to_owned(),
                        expected: "true or false".into(),
                    })?
            }
            "key_rotation_days" => self.key_rotation_days = int(key, value, 1, 3650)?,
            "max_sessions_per_user" => self.max_sessions_per_user = int(key, value, 1, 10_000)?,
            "audit_retention_days" => self.audit_retention_days = int(key, value, 1, 3650)?,
            other => return Err(ConfigValueError::UnknownKey(other.to_owned())),
        }
        Ok(())
    }

    /// Builds the policy from stored entries; an entry that no longer validates is
    /// skipped with a warning rather than stopping the service.
    pub fn from_entries(entries: &[(String, Value)]) -> Self {
        let mut config = Self::default();
        for (key, value) in entries {
            if let Err(e) = config.set(key, value) {
                tracing::warn!(key = %key, error = %e, "ignoring stored configuration entry");
            }
        }
        config
    }

    /// Every key with the value in force.
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }
}

/// The shared, refreshed view of the runtime policy.
#[derive(Default)]
pub struct RuntimeConfigHandle {
    current: RwLock<(String, Arc<RuntimeConfig>)>,
}

impl RuntimeConfigHandle {
    pub fn get(&self) -> Arc<RuntimeConfig> {
        match self.current.read() {
            Ok(guard) => guard.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    fn version(&self) -> String {
        match self.current.read() {
            Ok(guard) => guard.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    fn replace(&self, version: String, config: RuntimeConfig) {
        let value = (version, Arc::new(config));
        match self.current.write() {
            Ok(mut guard) => *guard = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }

    /// Reloads if the stored version changed; returns whether it did.
    pub async fn refresh(&self, db: &Database) -> Result<bool, StoreError> {
        let version = db.configuration_version().await?;
        if version == self.version() {
            return Ok(false);
        }
        let entries = db.load_configuration().await?;
        let config = RuntimeConfig::from_entries(&entries);
        if *self.get() != config {
            tracing::info!(version = %version, "runtime configuration changed");
        }
        self.replace(version, config);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn map_has_every_contract_key_with_defaults() {
        let map = RuntimeConfig::default().to_map();
        assert_eq!(map["access_token_ttl_seconds"], json!(900));
        assert_eq!(map["registration_enabled"], json!(false));
        for key in RuntimeConfig::KEYS {
            assert!(map.contains_key(key), "{key}");
        }
    }

    #[test]
    fn set_checks_key_type_and_range() {
        let mut c = RuntimeConfig::default();
        assert!(c.set("access_token_ttl_seconds", &json!(60)).is_ok());
        assert_eq!(c.access_token_ttl_seconds, 60);
        assert!(matches!(
            c.set("nope", &json!(1)),
            Err(ConfigValueError::UnknownKey(_))
        ));
        assert!(c.set("access_token_ttl_seconds", &json!("60")).is_err());
        assert!(c.set("access_token_ttl_seconds", &json!(0)).is_err());
        assert!(c.set("access_token_ttl_seconds", &json!(-5)).is_err());
        assert!(c.set("registration_enabled", &json!(1)).is_err());
        assert!(c.set("registration_enabled", &json!(true)).is_ok());
        assert!(c.set("password_min_score", &json!(5)).is_err());
    }

    #[test]
    fn bad_stored_entries_are_skipped() {
        let c = RuntimeConfig::from_entries(&[
            ("lockout_threshold".into(), json!("many")),
            ("lockout_window_seconds".into(), json!(60)),
        ]);
        assert_eq!(c.lockout_threshold, 5);
        assert_eq!(c.lockout_window_seconds, 60);
    }
}
