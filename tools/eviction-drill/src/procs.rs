//! The service replicas as OS processes: start, signal, wait, restart in place.
//!
//! A replica is a slot (name and port) that holds one process at a time, like a
//! pod's place in a Deployment: after an eviction the replacement takes the same
//! slot, so the load balancer's server line for it stays valid. Every process the
//! drill starts is written to `pids` in the work directory, so the wrapper script
//! can kill whatever a crashed drill leaves behind.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// Sends a signal with kill(1): the drill has no unsafe code, so no libc::kill.
pub async fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("run kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Appends a pid to the work directory's `pids` file (see the module doc).
pub fn record_pid(work_dir: &Path, pid: u32) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work_dir.join("pids"))
    {
        let _ = writeln!(f, "{pid}");
    }
}

/// A free loopback port below the ephemeral range, so that no outgoing connection
/// can take it between now and the moment a replica (re)binds it. Same idea as
/// `free_port` in scripts/lib/datastores.sh.
pub fn free_port(taken: &mut Vec<u16>, seed: &mut u64) -> Result<u16> {
    let ephemeral_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    let (lo, hi) = if ephemeral_lo > 12000 {
        (10000u16, ephemeral_lo - 1)
    } else {
        (20000, 50000)
    };
    for _ in 0..500 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let port = lo + u16::try_from(*seed % u64::from(hi - lo)).unwrap_or(0);
        // Redis Cluster bus ports are port+10000: stay clear of those too.
        if taken
            .iter()
            .any(|&t| t == port || u32::from(t) + 10000 == u32::from(port))
        {
            continue;
        }
        if TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            taken.push(port);
            return Ok(port);
        }
    }
    bail!("no free port found in {lo}-{hi}")
}

/// One replica slot of the service.
pub struct Replica {
    /// HAProxy server name, e.g. `r1`.
    pub name: String,
    pub port: u16,
    binary: PathBuf,
    env: BTreeMap<String, String>,
    log_dir: PathBuf,
    work_dir: PathBuf,
    /// How many processes this slot has had (names the log files).
    generation: u32,
    child: Option<Child>,
}

impl Replica {
    pub fn new(
        name: &str,
        port: u16,
        binary: &Path,
        mut env: BTreeMap<String, String>,
        work_dir: &Path,
    ) -> Self {
        env.insert("AUTH_LISTEN".into(), format!("127.0.0.1:{port}"));
        Self {
            name: name.to_owned(),
            port,
            binary: binary.to_owned(),
            env,
            log_dir: work_dir.join("logs"),
            work_dir: work_dir.to_owned(),
            generation: 0,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts a new process in this slot (the previous one must have exited).
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("{} is still running", self.name);
        }
        self.generation += 1;
        std::fs::create_dir_all(&self.log_dir)?;
        let log = self
            .log_dir
            .join(format!("{}-{}.log", self.name, self.generation));
        let log =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(&self.binary)
            .env_clear()
            .envs(&self.env)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(&self.work_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // If the drill itself dies, take the replica with it.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", self.binary.display()))?;
        if let Some(pid) = child.id() {
            record_pid(&self.work_dir, pid);
        }
        self.child = Some(child);
        Ok(())
    }

    /// Waits until this process answers `/health` with 200 on its own port.
    pub async fn wait_ready(&mut self, client: &reqwest::Client, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let url = format!("{}/health", self.url());
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            if !self.is_running() {
                bail!(
                    "{} exited while starting (log: {})",
                    self.name,
                    self.log_dir.display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} not ready after {within:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn signal(&self, sig: &str) -> Result<()> {
        match self.pid() {
            Some(pid) => signal(pid, sig).await,
            None => bail!("{} has no process", self.name),
        }
    }

    /// Waits for the process to exit; SIGKILLs it after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} has no process", self.name);
        };
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = child.start_kill();
                let status = child.wait().await?;
                bail!("{} did not exit within {within:?} ({status})", self.name)
            }
        }
    }

    /// Stops whatever runs in the slot, the fast way (end of the drill).
    pub async fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}
