//! The command line: serve (the default), and the operator commands `migrate`,
//! `create-user`, `rotate-keys` and `healthcheck`.
//!
//! The operator commands work on the same storage as the servers (whatever
//! `AUTH_*` says) but never bind a port, so they can run beside live replicas
//! (e.g. `kubectl exec`, a Job) or on a stopped embedded instance. Exit codes: 0
//! done, 1 the command failed, 2 the configuration is wrong.

use std::{
    io::{BufRead, IsTerminal, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use clap::{Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};

use crate::{
    app::Application,
    config::Config,
    metrics::Metrics,
    passwords::{self, HashError, PasswordHasher},
    runtime_config::{RuntimeConfig, RuntimeConfigHandle},
    shutdown,
    store::{Database, IdentityStore, StoreError},
    telemetry,
    tokens::keys::{embedded_key_encryption_key, KeyError, KeyRing, KeyTiming},
    users::{AuditEvent, NewUser, ADMIN_ROLE},
};

#[derive(Debug, Parser)]
#[command(name = "auth-service", version, about = "Authentication service")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Create a user. The password is read from the first line of stdin, never
    /// from the command line (where `ps` and shell history would keep it).
    CreateUser {
        #[arg(long)]
        username: String,
        #[arg(long)]
        email: Option<String>,
        /// A role to give the user; repeat for several. The built-in `admin` role
        /// (permission `auth:admin`) is created if it does not exist yet.
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
    },
    /// Add a new signing key now instead of waiting for the schedule. It is
    /// published at once and signs after AUTH_KEY_PUBLISH_LEAD.
    RotateKeys,
    /// Exit 0 when the local instance's /health answers 200 (for container checks).
    Healthcheck,
}

/// Runs the parsed command; configuration errors print one line and exit 2.
pub async fn run(cli: Cli) -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Migrate => migrate(config).await,
        Command::CreateUser {
            username,
            email,
            roles,
        } => {
            telemetry::init(config.log_format);
            report(
                "create-user",
                create_user(&config, &username, email.as_deref(), roles).await,
            )
        }
        Command::RotateKeys => {
            telemetry::init(config.log_format);
            report("rotate-keys", rotate_keys(&config).await)
        }
        Command::Healthcheck => healthcheck(&config),
    }
}

async fn serve(config: Config) -> ExitCode {
    telemetry::init(config.log_format);
    tracing::info!(config = ?config.summary(), version = env!("CARGO_PKG_VERSION"), "starting");
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            eprintln!("startup failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %app.local_addr(), "listening");
    match app.run_until_stopped(shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(config: Config) -> ExitCode {
    telemetry::init(config.log_format);
    let result = async {
        let db = Database::connect_lazy(&config)?;
        db.migrate().await?;
        db.close().await;
        Ok::<_, crate::store::StoreError>(())
    }
    .await;
    match result {
        Ok(()) => {
            tracing::info!("migrations applied");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("migration failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why an operator command failed; the text is for the operator and never holds
/// a secret.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    /// Something the operator can fix: bad input, a duplicate, a weak password.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("key-encryption key file in AUTH_DATA_DIR: {0}")]
    KeyFile(std::io::Error),
}

/// Prints a failure as one line on stderr and picks the exit code.
fn report(command: &str, result: Result<(), CommandError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{command} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What every operator command starts with: the database, migrated (a command
/// may be the first thing to touch a fresh database), and the runtime policy in
/// force, read the way a replica reads it.
async fn open_database(config: &Config) -> Result<(Database, Arc<RuntimeConfig>), StoreError> {
    let db = Database::connect_lazy(config)?;
    db.migrate().await?;
    let runtime = RuntimeConfigHandle::default();
    runtime.refresh(&db).await?;
    Ok((db, runtime.get()))
}

/// `create-user`: validates like the admin API, checks the password against the
/// runtime policy, and creates the user with an audit event. Prints the id.
async fn create_user(
    config: &Config,
    username: &str,
    email: Option<&str>,
    mut roles: Vec<String>,
) -> Result<(), CommandError> {
    // The same rules as POST /v1/admin/users, so the CLI cannot create a user the
    // API would refuse (usernames end up in headers and logs).
    let username = crate::users::validate_username(username)
        .map_err(|e| CommandError::Refused(e.to_string()))?;
    let email =
        crate::users::validate_email(email).map_err(|e| CommandError::Refused(e.to_string()))?;
    roles.sort();
    roles.dedup();
    let password = read_password(&username)?;

    let (db, policy) = open_database(config).await?;
    let result = async {
        passwords::check_policy(
            password.expose_secret(),
            &username,
            email.as_deref(),
            &policy,
        )
        .map_err(|v| CommandError::Refused(format!("password refused: {v}")))?;
        if roles.iter().any(|r| r == ADMIN_ROLE) {
            ensure_admin_role(&db).await?;
        }
        let hasher = PasswordHasher::new(&config.password_hash, Arc::new(Metrics::new()))?;
        let password_hash = hasher.hash(password).await?;
        let audit = AuditEvent::new("cli_user_create", "success")
            .username(&username)
            .detail(serde_json::json!({ "target": username, "roles": roles }));
        let new_user = NewUser {
            username: username.clone(),
            email,
            password_hash,
            roles,
        };
        db.create_user(&new_user, &audit)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(field) if field == "email" => {
                    CommandError::Refused("a user with this email already exists".into())
                }
                StoreError::Conflict(_) => {
                    CommandError::Refused(format!("user already exists: {username}"))
                }
                StoreError::Invalid { message, .. } => CommandError::Refused(format!(
                    "{message} (create it first with POST /v1/admin/roles)"
                )),
                e => e.into(),
            })
    }
    .await;
    db.close().await;
    let user = result?;
    println!("{}", user.id);
    Ok(())
}

/// Creates the built-in `admin` role if it is missing. Without this, a
/// PostgreSQL deployment started without AUTH_BOOTSTRAP_ADMIN_* would have no
/// way to get its first administrator: the admin API needs one already.
async fn ensure_admin_role(db: &Database) -> Result<(), CommandError> {
    if db.get_role(ADMIN_ROLE).await?.is_some() {
        return Ok(());
    }
    let role = crate::users::admin_role();
    let audit = AuditEvent::new("cli_role_create", "success")
        .detail(serde_json::json!({ "target": ADMIN_ROLE }));
    match db.create_role(&role, &audit).await {
        // Another operator or a bootstrapping replica made it meanwhile: fine.
        Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Longest stdin line we accept; far above any password policy's maximum, and
/// keeps `yes | auth-service create-user` from eating memory.
const MAX_PASSWORD_LINE: u64 = 8 * 1024;

/// The first line of stdin, without its line ending. On a terminal we warn
/// first: without a new dependency we cannot turn echo off, so the password
/// would be visible on screen (pipe it in instead).
fn read_password(username: &str) -> Result<SecretString, CommandError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!(
            "warning: the password will be visible as you type; pipe it in to avoid that \
             (e.g. `auth-service create-user ... < password-file`)"
        );
        eprint!("password for {username}: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = Vec::new();
    stdin
        .lock()
        .take(MAX_PASSWORD_LINE)
        .read_until(b'\n', &mut line)
        .map_err(|e| CommandError::Refused(format!("cannot read the password from stdin: {e}")))?;
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    } else if line.len() as u64 == MAX_PASSWORD_LINE {
        return Err(CommandError::Refused("password line is too long".into()));
    }
    if line.is_empty() {
        return Err(CommandError::Refused(
            "no password on stdin: give it as the first line of stdin".into(),
        ));
    }
    String::from_utf8(line)
        .map(SecretString::from)
        .map_err(|_| CommandError::Refused("the password is not valid UTF-8".into()))
}

/// `rotate-keys`: the scheduled rotation, forced. Replicas pick the new key up on
/// their next reload and it signs only after the publish lead, so this is as
/// safe as a scheduled rotation. Prints the new kid on stdout.
async fn rotate_keys(config: &Config) -> Result<(), CommandError> {
    let (db, policy) = open_database(config).await?;
    let result = async {
        // Built exactly as a replica builds its ring (see `Application::build`),
        // so the key is sealed under the same key-encryption key and algorithm.
        let kek = match &config.key_encryption_key {
            Some(kek) => kek.clone(),
            None => embedded_key_encryption_key(&config.data_dir).map_err(CommandError::KeyFile)?,
        };
        let keys = KeyRing::new(
            kek,
            config.signing_algorithm,
            KeyTiming {
                publish_lead: config.key_publish_lead,
            },
        );
        // A wrong AUTH_KEY_ENCRYPTION_KEY would seal a key no replica can open;
        // once it activated and the old key was pruned, nothing could sign.
        let stored = db.signing_keys().await?.len();
        let opened = keys.reload(&db).await?;
        if opened < stored {
            return Err(CommandError::Refused(format!(
                "{} of {stored} stored signing keys cannot be decrypted with this \
                 AUTH_KEY_ENCRYPTION_KEY; refusing to add a key the replicas could not use",
                stored - opened
            )));
        }
        let rotation = Duration::from_secs(policy.key_rotation_days.saturating_mul(86_400));
        let token_lifetime = Duration::from_secs(policy.access_token_ttl_seconds);
        let added = keys.maintain(&db, rotation, token_lifetime, true).await?;
        let now = chrono::Utc::now();
        let stored = db.signing_keys().await?;
        match added {
            Some(kid) => {
                match stored.iter().find(|k| k.kid == kid) {
                    Some(key) if key.activates_at > now => eprintln!(
                        "new signing key {kid} is published now and signs from {}",
                        key.activates_at.to_rfc3339()
                    ),
                    _ => eprintln!("created the first signing key {kid}; it signs now"),
                }
                println!("{kid}");
            }
            // Either a rotation was pending already, or another replica rotated
            // at the same moment; both leave a pending key, which is the result
            // the operator asked for.
            None => match stored.last() {
                Some(key) if key.activates_at > now => eprintln!(
                    "a rotation is already pending: key {} signs from {}; nothing to do",
                    key.kid,
                    key.activates_at.to_rfc3339()
                ),
                _ => {
                    return Err(CommandError::Refused(
                        "no key was added; run it again".into(),
                    ))
                }
            },
        }
        Ok(())
    }
    .await;
    db.close().await;
    result
}

/// A dependency-free HTTP/1.1 GET, so runtime images need no curl.
fn healthcheck(config: &Config) -> ExitCode {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = Duration::from_secs(3);
    let status = (|| -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 64];
        let n = stream.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..n]).into_owned())
    })();
    match status {
        Ok(line) if line.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(line) => {
            eprintln!("unhealthy: {}", line.lines().next().unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: cannot reach {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
