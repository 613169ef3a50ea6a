//! Breaking and mending the datastores that scripts/lib/datastores.sh started.
//!
//! Redis is driven with `redis-cli` and PostgreSQL with `pg_ctl`, the same tools
//! the library uses, so the drill needs no client of its own for either.

use std::{collections::BTreeMap, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{anyhow, bail, Context, Result};
use tokio::process::Command;

/// Configuration carried over when a Redis node is restarted: what
/// datastores.sh set on the command line plus what the drill changed with
/// CONFIG SET. (Redis rewrites its process title, so /proc's cmdline cannot be
/// reused, and the nodes run without a config file.)
const CARRIED: &[&str] = &[
    "port",
    "bind",
    "dir",
    "logfile",
    "pidfile",
    "cluster-enabled",
    "cluster-config-file",
    "cluster-node-timeout",
    "cluster-replica-validity-factor",
    "cluster-require-full-coverage",
    "repl-diskless-sync-delay",
    "save",
    "appendonly",
    "appendfsync",
    "enable-debug-command",
];

/// The Redis Cluster's nodes, by port.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    /// `--key value` pairs to restart each node with (see [`CARRIED`]).
    specs: BTreeMap<u16, Vec<(String, String)>>,
}

pub async fn redis_cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("run redis-cli")?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    if !out.status.success() || text.starts_with("ERR") || text.starts_with("Could not connect") {
        bail!("redis-cli -p {port} {}: {text}", args.join(" "));
    }
    Ok(text)
}

fn field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(str::to_owned)
}

impl RedisCluster {
    pub fn from_urls(urls: &str) -> Result<Self> {
        let ports = urls
            .split(',')
            .map(|u| {
                u.rsplit(':')
                    .next()
                    .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
                    .ok_or_else(|| anyhow!("cannot read a port in Redis URL {u}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ports,
            specs: BTreeMap::new(),
        })
    }

    /// Makes the throwaway cluster behave like the production one
    /// (k8s/overlays/self-hosted/redis.conf): an append-only file so a restarted
    /// node comes back with its sessions, a 5 s node timeout, and a shard's loss
    /// failing only its own keys. Then remembers how to restart each node.
    pub async fn configure_like_production(&mut self) -> Result<()> {
        for &port in &self.ports {
            for (k, v) in [
                ("appendonly", "yes"),
                ("appendfsync", "everysec"),
                ("cluster-node-timeout", "5000"),
                ("cluster-require-full-coverage", "no"),
            ] {
                redis_cli(port, &["config", "set", k, v]).await?;
            }
        }
        // Turning AOF on rewrites the file in the background; wait for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for &port in &self.ports {
            loop {
                let info = redis_cli(port, &["info", "persistence"]).await?;
                if field(&info, "aof_enabled").as_deref() == Some("1")
                    && field(&info, "aof_rewrite_in_progress").as_deref() == Some("0")
                    && field(&info, "aof_rewrite_scheduled").as_deref() == Some("0")
                {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("Redis {port}: append-only file not ready after 30 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for &port in &self.ports.clone() {
            let mut spec = Vec::new();
            for key in CARRIED {
                let out = redis_cli(port, &["config", "get", key]).await?;
                let mut lines = out.lines();
                if let (Some(_), Some(value)) = (lines.next(), lines.next()) {
                    spec.push(((*key).to_owned(), value.to_owned()));
                } else if *key == "save" {
                    spec.push(("save".into(), String::new()));
                }
            }
            self.specs.insert(port, spec);
        }
        Ok(())
    }

    pub async fn role(&self, port: u16) -> Result<String> {
        let out = redis_cli(port, &["role"]).await?;
        Ok(out.lines().next().unwrap_or_default().to_owned())
    }

    pub async fn pid(&self, port: u16) -> Result<u32> {
        let info = redis_cli(port, &["info", "server"]).await?;
        field(&info, "process_id")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("Redis {port}: no process_id"))
    }

    /// The first master and the port of its replica.
    pub async fn a_master_and_its_replica(&self) -> Result<(u16, u16)> {
        for &port in &self.ports {
            if self.role(port).await? == "master" {
                let info = redis_cli(port, &["info", "replication"]).await?;
                // slave0:ip=127.0.0.1,port=12345,state=online,...
                let replica = field(&info, "slave0")
                    .and_then(|s| {
                        s.split(',')
                            .find_map(|kv| kv.strip_prefix("port="))
                            .and_then(|p| p.parse::<u16>().ok())
                    })
                    .ok_or_else(|| anyhow!("Redis master {port} has no replica"))?;
                return Ok((port, replica));
            }
        }
        bail!("no Redis master found")
    }

    /// SIGKILLs the given nodes at once (one kill(1) for all).
    pub async fn kill(&self, ports: &[u16]) -> Result<()> {
        let mut pids = Vec::new();
        for &port in ports {
            pids.push(self.pid(port).await?.to_string());
        }
        let status = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .status()
            .await?;
        if !status.success() {
            bail!("kill -KILL {} failed", pids.join(" "));
        }
        // Wait until they no longer answer.
        for &port in ports {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while redis_cli(port, &["ping"]).await.is_ok() {
                if tokio::time::Instant::now() > deadline {
                    bail!("Redis {port} still answers after SIGKILL");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Starts a killed node again with its carried configuration; it loads its
    /// append-only file and its cluster state (nodes.conf) from its directory.
    pub async fn restart(&self, port: u16) -> Result<()> {
        let spec = self
            .specs
            .get(&port)
            .ok_or_else(|| anyhow!("no restart spec for Redis {port}"))?;
        let mut cmd = Command::new("redis-server");
        for (k, v) in spec {
            cmd.arg(format!("--{k}")).arg(v);
        }
        let status = cmd
            .args(["--daemonize", "yes"])
            .stdout(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("redis-server for port {port} did not start");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            // A node answers LOADING while it reads its append-only file.
            if redis_cli(port, &["ping"])
                .await
                .is_ok_and(|p| p.trim() == "PONG")
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("Redis {port} did not come back");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `port` is a master (a replica promoted by failover).
    pub async fn wait_master(&self, port: u16, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.role(port).await.is_ok_and(|r| r == "master") {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("Redis {port} not promoted within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every node reports `cluster_state:ok`, knows every node, and
    /// every replica is in sync with its master.
    pub async fn wait_healthy(&self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let total = self.ports.len().to_string();
        loop {
            let mut pending = None;
            for &port in &self.ports {
                let ok = async {
                    let info = redis_cli(port, &["cluster", "info"]).await?;
                    if field(&info, "cluster_state").as_deref() != Some("ok")
                        || field(&info, "cluster_known_nodes").as_deref() != Some(&total)
                    {
                        bail!("cluster state not ok");
                    }
                    let repl = redis_cli(port, &["info", "replication"]).await?;
                    if field(&repl, "role").as_deref() == Some("slave")
                        && field(&repl, "master_link_status").as_deref() != Some("up")
                    {
                        bail!("replica not in sync");
                    }
                    Ok(())
                }
                .await;
                if let Err(e) = ok {
                    pending = Some(format!("{port}: {e}"));
                    break;
                }
            }
            match pending {
                None => return Ok(()),
                Some(why) if tokio::time::Instant::now() > deadline => {
                    bail!("Redis Cluster not healthy after {within:?} ({why})")
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// The PostgreSQL instance: stopped and started with pg_ctl as its OS user.
pub struct Postgres {
    pub data_dir: PathBuf,
    pub port: u16,
    bin_dir: PathBuf,
    os_user: String,
}

impl Postgres {
    pub fn new(data_dir: PathBuf, url: &str, bin_dir: PathBuf, os_user: String) -> Result<Self> {
        // postgres://postgres@127.0.0.1:<port>/postgres
        let port = url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no port in AUTH_TEST_DATABASE_URL"))?;
        Ok(Self {
            data_dir,
            port,
            bin_dir,
            os_user,
        })
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let running_as_root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|u| u.split_whitespace().next().map(|u| u == "0"))
            })
            .unwrap_or(false);
        let mut cmd = if running_as_root && self.os_user != "root" {
            // initdb/postgres refuse to run as root; datastores.sh ran them as
            // AUTH_TEST_PG_OS_USER, and so do we.
            let mut c = Command::new("runuser");
            c.arg("-u").arg(&self.os_user).arg("--").arg(pg_ctl);
            c
        } else {
            Command::new(pg_ctl)
        };
        cmd.arg("-D").arg(&self.data_dir).args(args);
        // A directory that user can read (the data dir's parent, as datastores.sh).
        if let Some(parent) = self.data_dir.parent() {
            cmd.current_dir(parent);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        cmd
    }

    /// Stops PostgreSQL like a crash or a failover would: `-m immediate`.
    pub async fn stop(&self) -> Result<()> {
        let out = self
            .pg_ctl(&["-m", "immediate", "-w", "-t", "30", "stop"])
            .output()
            .await?;
        if !out.status.success() {
            bail!("pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Starts it again on the same port and waits until it accepts connections.
    pub async fn start(&self) -> Result<()> {
        let log = self
            .data_dir
            .parent()
            .map(|p| p.join("postgres.log"))
            .unwrap_or_else(|| PathBuf::from("postgres.log"));
        let log = log.display().to_string();
        let port = format!("-p {}", self.port);
        let out = self
            .pg_ctl(&["-l", &log, "-o", &port, "-w", "-t", "30", "start"])
            .output()
            .await?;
        if !out.status.success() {
            bail!("pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}
