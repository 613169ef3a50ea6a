//! Infrastructure configuration, read once from the environment at startup.
//!
//! Every variable of the contract's table is parsed and validated here, so a bad
//! value stops the process before it binds a port, with one line that names the
//! variable. Runtime policy (TTLs, lockout, password rules) is not here: it lives in
//! the database and is handled by [`crate::runtime_config`].

use std::{
    collections::HashMap,
    fmt,
    io::IsTerminal,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use base64::Engine as _;
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretBox, SecretString};

/// A configuration error: which variable is wrong, and how.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

impl ConfigError {
    fn new(variable: &'static str, message: impl Into<String>) -> Self {
        Self {
            variable,
            message: message.into(),
        }
    }
}

/// Where users, roles, keys and configuration live.
#[derive(Debug, Clone)]
pub enum DatabaseConfig {
    /// Shared PostgreSQL; the URL may carry a password, so it stays secret.
    Postgres { url: SecretString },
    /// One SQLite file in `AUTH_DATA_DIR`: development and single-instance use.
    Embedded,
}

/// The Redis deployment that holds sessions.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URLs; secret because they may carry a password.
    pub urls: Vec<SecretString>,
    /// Talk the cluster protocol (several URLs, or `AUTH_REDIS_CLUSTER=true`).
    pub cluster: bool,
}

/// What validation does with a token whose session cannot be checked because
/// Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutagePolicy {
    /// Accept a token with a valid signature and `exp`, and count it.
    Degraded,
    /// Answer 503: revocation must always be enforced.
    Strict,
}

/// Which browser origins may call the API (CORS). Without `AUTH_CORS_ORIGINS` no
/// CORS header is ever sent, so browsers keep the same-origin policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `*`: any origin. Safe only because the API takes bearer tokens, never
    /// cookies, so a foreign page cannot act with a user's ambient credentials.
    Any,
    /// Exact origins such as `https://app.example.com`.
    List(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// The 32-byte key that encrypts signing keys at rest.
pub struct KeyEncryptionKey(SecretBox<[u8; 32]>);

impl KeyEncryptionKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(SecretBox::new(Box::new(bytes)))
    }

    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }
}

impl Clone for KeyEncryptionKey {
    fn clone(&self) -> Self {
        Self::new(*self.expose())
    }
}

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// The administrator to create when the user table is empty.
#[derive(Debug, Clone)]
pub struct BootstrapAdmin {
    pub username: String,
    pub password: SecretString,
}

/// Argon2id cost parameters and the bounds of the hashing pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordHashConfig {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Hashes computed at once (threads of the blocking pool given to argon2).
    pub concurrency: usize,
    /// Hashes allowed to wait for a thread; beyond it logins get 503.
    pub queue: usize,
}

/// Everything the process needs from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database: DatabaseConfig,
    pub data_dir: PathBuf,
    pub redis: Option<RedisConfig>,
    pub key_encryption_key: Option<KeyEncryptionKey>,
    pub issuer: String,
    pub audience: String,
    pub session_outage_policy: OutagePolicy,
    pub trusted_proxies: Vec<IpNet>,
    pub shutdown_delay: Duration,
    pub drain_timeout: Duration,
    pub bootstrap_admin: Option<BootstrapAdmin>,
    pub log_format: LogFormat,
    pub password_hash: PasswordHashConfig,
    /// Upper bound for one request, end to end.
    pub request_timeout: Duration,
    /// Upper bound for one call to PostgreSQL or Redis.
    pub dependency_timeout: Duration,
    /// Requests served at once on the API routes; beyond it 503 instead of a queue.
    pub max_concurrent_requests: usize,
    /// How long a new signing key is published before it signs.
    pub key_publish_lead: Duration,
    /// `EdDSA` (Ed25519, default) or `ES256`.
    pub signing_algorithm: jsonwebtoken::Algorithm,
    /// How long a client may take to send a request's headers; also how long an
    /// idle keep-alive connection stays open (hyper times both the same way).
    /// Bounds slowloris connections that never finish their headers.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a whole request body (408 after it).
    pub body_read_timeout: Duration,
    /// Browser origins allowed by CORS; None: CORS off.
    pub cors_origins: Option<CorsOrigins>,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`, so tests can pass a map.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // An empty variable counts as unset: `AUTH_REDIS_URLS=` in a manifest means
        // "none", not "a list with one empty URL".
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());

        let listen = match get("AUTH_LISTEN") {
            None => SocketAddr::from(([0, 0, 0, 0], 8080)),
            Some(v) => v.trim().parse().map_err(|_| {
                ConfigError::new(
                    "AUTH_LISTEN",
                    format!("{v:?} is not an address like 0.0.0.0:8080"),
                )
            })?,
        };

        let database = match get("AUTH_DATABASE_URL") {
            None => DatabaseConfig::Embedded,
            Some(v) => {
                let v = v.trim();
                if !(v.starts_with("postgres://") || v.starts_with("postgresql://")) {
                    return Err(ConfigError::new(
                        "AUTH_DATABASE_URL",
                        "must be a postgres:// or postgresql:// URL",
                    ));
                }
                DatabaseConfig::Postgres {
                    url: SecretString::from(v.to_owned()),
                }
            }
        };

        let data_dir = PathBuf::from(get("AUTH_DATA_DIR").unwrap_or_else(|| "./data".into()));

        let cluster_flag = match get("AUTH_REDIS_CLUSTER") {
            None => None,
            Some(v) => Some(parse_bool("AUTH_REDIS_CLUSTER", &v)?),
        };
        let redis = match get("AUTH_REDIS_URLS") {
            None => {
                if cluster_flag == Some(true) {
                    return Err(ConfigError::new(
                        "AUTH_REDIS_CLUSTER",
                        "is true but AUTH_REDIS_URLS is not set",
                    ));
                }
                None
            }
            Some(v) => {
                let urls = v
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(|u| validate_redis_url(u).map(|()| SecretString::from(u.to_owned())))
                    .collect::<Result<Vec<_>, _>>()?;
                let cluster = cluster_flag.unwrap_or(urls.len() > 1);
                if !cluster && urls.len() > 1 {
                    return Err(ConfigError::new(
                        "AUTH_REDIS_URLS",
                        "several URLs need Redis Cluster, but AUTH_REDIS_CLUSTER is false",
                    ));
                }
                Some(RedisConfig { urls, cluster })
            }
        };

        // Replicas share sessions only through Redis; PostgreSQL without Redis would
        // silently give each replica a private session store.
        if matches!(database, DatabaseConfig::Postgres { .. }) && redis.is_none() {
            return Err(ConfigError::new(
                "AUTH_REDIS_URLS",
                "is required with AUTH_DATABASE_URL: replicas share sessions through Redis",
            ));
        }

        let key_encryption_key = match get("AUTH_KEY_ENCRYPTION_KEY") {
            None if matches!(database, DatabaseConfig::Postgres { .. }) => {
                return Err(ConfigError::new(
                    "AUTH_KEY_ENCRYPTION_KEY",
                    "is required with PostgreSQL (base64 of 32 random bytes, e.g. `openssl rand -base64 32`)",
                ))
            }
            None => None,
            Some(v) => Some(parse_key_encryption_key(&v)?),
        };

        let issuer = get("AUTH_ISSUER").unwrap_or_else(|| "http://localhost:8080".into());
        if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
            return Err(ConfigError::new(
                "AUTH_ISSUER",
                "must be an http:// or https:// URL",
            ));
        }
        let issuer = issuer.trim_end_matches('/').to_owned();
        let audience = get("AUTH_AUDIENCE").unwrap_or_else(|| "auth-service".into());

        let session_outage_policy = match get("AUTH_SESSION_OUTAGE_POLICY").as_deref() {
            None | Some("degraded") => OutagePolicy::Degraded,
            Some("strict") => OutagePolicy::Strict,
            Some(other) => {
                return Err(ConfigError::new(
                    "AUTH_SESSION_OUTAGE_POLICY",
                    format!("{other:?} is not `degraded` or `strict`"),
                ))
            }
        };

        let trusted_proxies = match get("AUTH_TRUSTED_PROXIES") {
            None => Vec::new(),
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(parse_cidr)
                .collect::<Result<_, _>>()?,
        };

        let shutdown_delay = duration(&get, "AUTH_SHUTDOWN_DELAY", Duration::from_secs(5))?;
        let drain_timeout = duration(&get, "AUTH_DRAIN_TIMEOUT", Duration::from_secs(20))?;

        let bootstrap_admin = match (
            get("AUTH_BOOTSTRAP_ADMIN_USERNAME"),
            lookup("AUTH_BOOTSTRAP_ADMIN_PASSWORD").filter(|p| !p.is_empty()),
        ) {
            (None, None) => None,
            (Some(username), Some(password)) => {
                // The rules of every account, checked before anything starts: the
                // bootstrap administrator is the most powerful account there is.
                // The password against the default policy (the stored one is not
                // readable yet; a fresh database has no other).
                let username = crate::users::validate_username(username.trim())
                    .map_err(|e| ConfigError::new("AUTH_BOOTSTRAP_ADMIN_USERNAME", e.message))?;
                crate::passwords::check_policy(
                    &password,
                    &username,
                    None,
                    &crate::runtime_config::RuntimeConfig::default(),
                )
                .map_err(|v| ConfigError::new("AUTH_BOOTSTRAP_ADMIN_PASSWORD", v.0))?;
                Some(BootstrapAdmin {
                    username,
                    password: SecretString::from(password),
                })
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "AUTH_BOOTSTRAP_ADMIN_PASSWORD",
                    "is required when AUTH_BOOTSTRAP_ADMIN_USERNAME is set",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "AUTH_BOOTSTRAP_ADMIN_USERNAME",
                    "is required when AUTH_BOOTSTRAP_ADMIN_PASSWORD is set",
                ))
            }
        };

        let log_format = match get("AUTH_LOG_FORMAT").as_deref() {
            None if std::io::stdout().is_terminal() => LogFormat::Pretty,
            None => LogFormat::Json,
            Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(ConfigError::new(
                    "AUTH_LOG_FORMAT",
                    format!("{other:?} is not `json` or `pretty`"),
                ))
            }
        };

        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let concurrency = number(&get, "AUTH_PASSWORD_HASH_CONCURRENCY", cores, 1..=1024)?;
        let password_hash = PasswordHashConfig {
            memory_kib: number(&get, "AUTH_PASSWORD_HASH_MEMORY_KIB", 19_456, 8..=4_194_304)?,
            iterations: number(&get, "AUTH_PASSWORD_HASH_ITERATIONS", 2, 1..=64)?,
            parallelism: number(&get, "AUTH_PASSWORD_HASH_PARALLELISM", 1, 1..=64)?,
            concurrency,
            queue: number(
                &get,
                "AUTH_PASSWORD_HASH_QUEUE",
                concurrency * 4,
                0..=100_000,
            )?,
        };

        Ok(Self {
            listen,
            database,
            data_dir,
            redis,
            key_encryption_key,
            issuer,
            audience,
            session_outage_policy,
            trusted_proxies,
            shutdown_delay,
            drain_timeout,
            bootstrap_admin,
            log_format,
            password_hash,
            request_timeout: duration(&get, "AUTH_REQUEST_TIMEOUT", Duration::from_secs(10))?,
            dependency_timeout: duration(
                &get,
                "AUTH_DEPENDENCY_TIMEOUT",
                Duration::from_millis(1000),
            )?,
            max_concurrent_requests: number(
                &get,
                "AUTH_MAX_CONCURRENT_REQUESTS",
                1024,
                1..=1_000_000,
            )?,
            key_publish_lead: duration(&get, "AUTH_KEY_PUBLISH_LEAD", Duration::from_secs(360))?,
            signing_algorithm: match get("AUTH_SIGNING_ALGORITHM").as_deref() {
                None | Some("EdDSA") => jsonwebtoken::Algorithm::EdDSA,
                Some("ES256") => jsonwebtoken::Algorithm::ES256,
                Some(other) => {
                    return Err(ConfigError::new(
                        "AUTH_SIGNING_ALGORITHM",
                        format!("{other:?} is not EdDSA or ES256"),
                    ))
                }
            },
            header_read_timeout: positive_duration(
                &get,
                "AUTH_HEADER_READ_TIMEOUT",
                Duration::from_secs(30),
            )?,
            body_read_timeout: positive_duration(
                &get,
                "AUTH_BODY_READ_TIMEOUT",
                Duration::from_secs(5),
            )?,
            cors_origins: match get("AUTH_CORS_ORIGINS") {
                None => None,
                Some(v) => Some(parse_cors_origins(&v)?),
            },
        })
    }

    /// Configuration for a test or an embedded run in `data_dir`: every default of
    /// the contract, with the given storage.
    pub fn for_storage(
        database: DatabaseConfig,
        redis: Option<RedisConfig>,
        data_dir: PathBuf,
    ) -> Result<Self, ConfigError> {
        let mut config = Self::from_lookup(|_| None)?;
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.database = database;
        config.redis = redis;
        config.data_dir = data_dir;
        Ok(config)
    }

    /// Whether `ip` is a proxy whose `X-Forwarded-For` we believe.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The key/value view used by `auth-service` logs at startup: no secret values.
    pub fn summary(&self) -> HashMap<&'static str, String> {
        HashMap::from([
            ("listen", self.listen.to_string()),
            (
                "database",
                match self.database {
                    DatabaseConfig::Postgres { .. } => "postgres".into(),
                    DatabaseConfig::Embedded => "embedded-sqlite".into(),
                },
            ),
            (
                "redis",
                match &self.redis {
                    None => "none".into(),
                    Some(r) if r.cluster => format!("cluster ({} seed URLs)", r.urls.len()),
                    Some(_) => "single".into(),
                },
            ),
            ("issuer", self.issuer.clone()),
            ("audience", self.audience.clone()),
        ])
    }
}

fn parse_bool(variable: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(ConfigError::new(
            variable,
            format!("{other:?} is not true or false"),
        )),
    }
}

fn validate_redis_url(url: &str) -> Result<(), ConfigError> {
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    // Parse with the client's own parser so anything accepted here connects later;
    // the URL is not echoed because it may hold a password.
    if !scheme_ok || redis::parse_redis_url(url).is_none() {
        return Err(ConfigError::new(
            "AUTH_REDIS_URLS",
            "each entry must be a redis:// or rediss:// URL like redis://host:6379",
        ));
    }
    Ok(())
}

fn parse_key_encryption_key(v: &str) -> Result<KeyEncryptionKey, ConfigError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .map_err(|_| ConfigError::new("AUTH_KEY_ENCRYPTION_KEY", "is not valid base64"))?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        ConfigError::new(
            "AUTH_KEY_ENCRYPTION_KEY",
            format!("must decode to exactly 32 bytes, got {}", b.len()),
        )
    })?;
    Ok(KeyEncryptionKey::new(bytes))
}

fn parse_cidr(s: &str) -> Result<IpNet, ConfigError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            ConfigError::new(
                "AUTH_TRUSTED_PROXIES",
                format!("{s:?} is not a CIDR like 10.0.0.0/8"),
            )
        })
}

fn duration(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match get(variable) {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim()).map_err(|_| {
            ConfigError::new(
                variable,
                format!("{v:?} is not a duration like 5s or 500ms"),
            )
        }),
    }
}

/// A duration that must not be zero (a zero timeout would refuse every client).
fn positive_duration(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = duration(get, variable, default)?;
    if d.is_zero() {
        return Err(ConfigError::new(variable, "must be longer than zero"));
    }
    Ok(d)
}

/// `*`, or comma-separated origins: scheme and host (and port), nothing else, the
/// way browsers send them in `Origin`. A path or a trailing slash never matches a
/// browser's `Origin`, so it is refused rather than silently allowing nobody.
fn parse_cors_origins(v: &str) -> Result<CorsOrigins, ConfigError> {
    let entries: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if entries == ["*"] {
        return Ok(CorsOrigins::Any);
    }
    let mut origins = Vec::with_capacity(entries.len());
    for entry in entries {
        let rest = entry
            .strip_prefix("https://")
            .or_else(|| entry.strip_prefix("http://"));
        let valid = rest.is_some_and(|host| {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        });
        if !valid {
            return Err(ConfigError::new(
                "AUTH_CORS_ORIGINS",
                format!(
                    "{entry:?} is not an origin like https://app.example.com (scheme and host, \
                     no path), and `*` must stand alone"
                ),
            ));
        }
        origins.push(entry.to_ascii_lowercase());
    }
    Ok(CorsOrigins::List(origins))
}

fn number<T>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(v) = get(variable) else {
        return Ok(default);
    };
    match v.trim().parse::<T>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(ConfigError::new(
            variable,
            format!(
                "{v:?} is not a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    const KEK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn defaults_are_the_contracts() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert!(matches!(c.database, DatabaseConfig::Embedded));
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert!(c.redis.is_none());
        assert_eq!(c.issuer, "http://localhost:8080");
        assert_eq!(c.audience, "auth-service");
        assert_eq!(c.session_outage_policy, OutagePolicy::Degraded);
        assert_eq!(c.shutdown_delay, Duration::from_secs(5));
        assert_eq!(c.drain_timeout, Duration::from_secs(20));
        assert_eq!(c.password_hash.memory_kib, 19_456);
        assert_eq!(c.password_hash.iterations, 2);
        assert_eq!(c.password_hash.parallelism, 1);
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("AUTH_LISTEN", "nope")], "AUTH_LISTEN"),
            (&[("AUTH_REDIS_URLS", "http://x")], "AUTH_REDIS_URLS"),
            (
                &[("AUTH_KEY_ENCRYPTION_KEY", "c2hvcnQ=")],
                "AUTH_KEY_ENCRYPTION_KEY",
            ),
            (&[("AUTH_DATABASE_URL", "mysql://x")], "AUTH_DATABASE_URL"),
            (
                &[
                    ("AUTH_DATABASE_URL", "postgres://x/db"),
                    ("AUTH_REDIS_URLS", "redis://r"),
                ],
                "AUTH_KEY_ENCRYPTION_KEY",
            ),
            (
                &[
                    ("AUTH_DATABASE_URL", "postgres://x/db"),
                    ("AUTH_KEY_ENCRYPTION_KEY", KEK),
                ],
                "AUTH_REDIS_URLS",
            ),
            (
                &[("AUTH_SESSION_OUTAGE_POLICY", "lax")],
                "AUTH_SESSION_OUTAGE_POLICY",
            ),
            (
                &[("AUTH_TRUSTED_PROXIES", "10.0.0.0/99")],
                "AUTH_TRUSTED_PROXIES",
            ),
            (&[("AUTH_SHUTDOWN_DELAY", "soon")], "AUTH_SHUTDOWN_DELAY"),
            (&[("AUTH_DRAIN_TIMEOUT", "-1s")], "AUTH_DRAIN_TIMEOUT"),
            (
                &[("AUTH_BOOTSTRAP_ADMIN_USERNAME", "root")],
                "AUTH_BOOTSTRAP_ADMIN_PASSWORD",
            ),
            (&[("AUTH_LOG_FORMAT", "xml")], "AUTH_LOG_FORMAT"),
            (&[("AUTH_REDIS_CLUSTER", "maybe")], "AUTH_REDIS_CLUSTER"),
            (&[("AUTH_ISSUER", "localhost")], "AUTH_ISSUER"),
            (
                &[("AUTH_HEADER_READ_TIMEOUT", "0s")],
                "AUTH_HEADER_READ_TIMEOUT",
            ),
            (
                &[("AUTH_BODY_READ_TIMEOUT", "fast")],
                "AUTH_BODY_READ_TIMEOUT",
            ),
            (
                &[("AUTH_CORS_ORIGINS", "https://app.example.com/")],
                "AUTH_CORS_ORIGINS",
            ),
            (
                &[("AUTH_CORS_ORIGINS", "app.example.com")],
                "AUTH_CORS_ORIGINS",
            ),
            (
                &[("AUTH_CORS_ORIGINS", "*,https://a.example")],
                "AUTH_CORS_ORIGINS",
            ),
        ];
        for (vars, variable) in cases {
            let err = parse(vars).expect_err(variable);
            assert_eq!(err.variable, *variable, "{vars:?}");
            assert!(err.to_string().starts_with(variable));
        }
    }

    #[test]
    fn redis_cluster_follows_url_count_or_flag() {
        let c = parse(&[("AUTH_REDIS_URLS", "redis://a:1,redis://b:2")]).unwrap();
        assert!(c.redis.unwrap().cluster);
        let c = parse(&[("AUTH_REDIS_URLS", "redis://a:1")]).unwrap();
        assert!(!c.redis.unwrap().cluster);
        let c = parse(&[
            ("AUTH_REDIS_URLS", "redis://a:1"),
            ("AUTH_REDIS_CLUSTER", "true"),
        ])
        .unwrap();
        assert!(c.redis.unwrap().cluster);
    }

    #[test]
    fn secrets_never_print() {
        let c = parse(&[
            ("AUTH_DATABASE_URL", "postgres://u:hunter2@db/auth"),
            ("AUTH_REDIS_URLS", "redis://:redispass@r:6379"),
            ("AUTH_KEY_ENCRYPTION_KEY", KEK),
            ("AUTH_BOOTSTRAP_ADMIN_USERNAME", "root"),
            ("AUTH_BOOTSTRAP_ADMIN_PASSWORD", "bootpass-quiet-meadow-71"),
        ])
        .unwrap();
        let printed = format!("{c:?}");
        for secret in ["hunter2", "redispass", KEK, "bootpass-quiet", "[0, 1, 2"] {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
        assert!(printed.contains("REDACTED"));
    }

    #[test]
    fn client_limits_default_and_parse() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.body_read_timeout, Duration::from_secs(5));
        assert_eq!(c.cors_origins, None, "CORS is off unless configured");
        let c = parse(&[
            ("AUTH_HEADER_READ_TIMEOUT", "2s"),
            ("AUTH_BODY_READ_TIMEOUT", "750ms"),
        ])
        .unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.body_read_timeout, Duration::from_millis(750));
    }

    #[test]
    fn cors_origins_are_exact_origins_or_a_lone_star() {
        let c = parse(&[(
            "AUTH_CORS_ORIGINS",
            " https://App.example.com, http://localhost:3000 ,",
        )])
        .unwrap();
        assert_eq!(
            c.cors_origins,
            Some(CorsOrigins::List(vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into()
            ]))
        );
        let c = parse(&[("AUTH_CORS_ORIGINS", "*")]).unwrap();
        assert_eq!(c.cors_origins, Some(CorsOrigins::Any));
        let c = parse(&[("AUTH_CORS_ORIGINS", "  ")]).unwrap();
        assert_eq!(c.cors_origins, None, "empty means unset");
    }

    #[test]
    fn trusted_proxies_accept_cidrs_and_bare_addresses() {
        let c = parse(&[("AUTH_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7")]).unwrap();
        assert!(c.is_trusted_proxy("10.2.3.4".parse().unwrap()));
        assert!(c.is_trusted_proxy("192.168.1.7".parse().unwrap()));
        assert!(!c.is_trusted_proxy("192.168.1.8".parse().unwrap()));
    }
}
