//! The one Redis handle the rest of the service uses: a Redis Cluster client or a
//! single-node connection manager behind the same calls.
//!
//! Both kinds connect lazily (a replica starts while Redis is down and connects
//! when it returns), reconnect by themselves, and every command runs through a
//! [`Guard`], so no request waits longer than the dependency timeout.
//!
//! In a cluster there is one guard (one circuit breaker) per master: a command
//! names the key it routes by, and its slot picks the master's guard from a slot
//! map this handle keeps (`CLUSTER SLOTS`, reread every few seconds and whenever a
//! call fails). So a master that hangs or dies trips only its own breaker: the
//! slots of the other masters keep being served, instead of one breaker for all of
//! Redis failing every user because a third of them were on the lost node.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    Cmd, FromRedisValue, Pipeline, RedisFuture, Value,
};
use secrecy::ExposeSecret;
use tokio::sync::OnceCell;

use super::{guard::Guard, Dependency, StoreError};
use crate::config::RedisConfig;

enum Target {
    Cluster(redis::cluster::ClusterClient),
    Single(redis::Client),
}

/// A live connection of either kind; cheap to clone (both multiplex one socket per
/// node, and reconnect by themselves), so each call works on its own clone.
#[derive(Clone)]
pub enum Connection {
    Cluster(ClusterConnection),
    Single(ConnectionManager),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Single(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Cluster(c) => c.get_db(),
            Self::Single(c) => c.get_db(),
        }
    }
}

/// Hash slots of Redis Cluster.
const SLOTS: usize = 16_384;

/// How often the slot map is reread when nothing failed (failovers and resharding
/// that our calls did not notice).
const SLOT_MAP_MAX_AGE: Duration = Duration::from_secs(5);

/// The least time between two rereads of the slot map, however many calls fail.
const SLOT_MAP_MIN_AGE: Duration = Duration::from_millis(500);

/// Which master serves each slot, and that master's guard.
struct SlotMap {
    /// Index into `nodes` per slot; `u16::MAX` where no master is known.
    owner: Vec<u16>,
    /// `host:port` of each master, and its guard.
    nodes: Vec<(String, Arc<Guard>)>,
}

/// The circuit breakers of one Redis deployment.
enum Breakers {
    /// A single node: one breaker.
    Single(Arc<Guard>),
    /// A cluster: one breaker per master (see the module doc).
    Cluster {
        map: RwLock<Arc<SlotMap>>,
        /// For slots whose master is not known yet (before the first map).
        unmapped: Arc<Guard>,
        /// A reread of the map is running.
        refreshing: AtomicBool,
        /// When the map was last reread, in ms since `epoch` (0: never).
        refreshed_ms: AtomicU64,
        epoch: Instant,
    },
}

struct Inner {
    target: Target,
    /// Made on first use, then never replaced (it reconnects by itself). A
    /// `OnceCell` rather than a mutex: once set, reading it is one atomic load,
    /// where before every Redis call queued for one lock to clone it.
    connection: OnceCell<Connection>,
    /// A second connection, for pipelines ending in `WAIT` (durable session
    /// writes). Redis answers one connection's commands in order, and both kinds
    /// multiplex all callers over one connection per node: on the shared one, a
    /// `WAIT` held up every validation queued behind it on that node, for as long
    /// as the replica took to acknowledge (up to its 200 ms bound).
    waiting_connection: OnceCell<Connection>,
    breakers: Breakers,
    timeout: Duration,
}

/// The Redis handle. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

impl Redis {
    /// Validates the URLs and builds the client; does not connect.
    pub fn new(config: &RedisConfig, timeout: Duration) -> Result<Self, StoreError> {
        let urls: Vec<String> = config
            .urls
            .iter()
            .map(|u| u.expose_secret().to_owned())
            .collect();
        let guard = || Arc::new(Guard::new(Dependency::Redis, timeout));
        let (target, breakers) = if config.cluster {
            let client = ClusterClientBuilder::new(urls)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                // Retries cover MOVED/ASK and failovers; the guard's timeout caps
                // the total, so a few quick retries are all that fit anyway.
                .retries(3)
                .build()?;
            let breakers = Breakers::Cluster {
                map: RwLock::new(Arc::new(SlotMap {
                    owner: vec![u16::MAX; SLOTS],
                    nodes: Vec::new(),
                })),
                unmapped: guard(),
                refreshing: AtomicBool::new(false),
                refreshed_ms: AtomicU64::new(0),
                epoch: Instant::now(),
            };
            (Target::Cluster(client), breakers)
        } else {
            let url = urls.into_iter().next().ok_or_else(|| {
                StoreError::Redis(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "no Redis URL",
                )))
            })?;
            (
                Target::Single(redis::Client::open(url)?),
                Breakers::Single(guard()),
            )
        };
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                connection: OnceCell::new(),
                waiting_connection: OnceCell::new(),
                breakers,
                timeout,
            }),
        })
    }

    /// Whether any node's breaker is open (calls to it short-circuited).
    pub fn any_breaker_open(&self) -> bool {
        match &self.inner.breakers {
            Breakers::Single(guard) => guard.is_open(),
            Breakers::Cluster { map, unmapped, .. } => {
                unmapped.is_open() || read(map).nodes.iter().any(|(_, g)| g.is_open())
            }
        }
    }

    /// The guard of the node that serves `route` (a key, or any key of its slot).
    fn guard_for(&self, route: &str) -> Arc<Guard> {
        match &self.inner.breakers {
            Breakers::Single(guard) => guard.clone(),
            Breakers::Cluster {
                map,
                unmapped,
                refreshed_ms,
                epoch,
                ..
            } => {
                let last = refreshed_ms.load(Ordering::Acquire);
                let age = (epoch.elapsed().as_millis() as u64).saturating_sub(last);
                if last == 0 || age > SLOT_MAP_MAX_AGE.as_millis() as u64 {
                    self.reread_slot_map();
                }
                let map = read(map);
                match map
                    .owner
                    .get(usize::from(key_slot(route.as_bytes())))
                    .and_then(|i| map.nodes.get(usize::from(*i)))
                {
                    Some((_, guard)) => guard.clone(),
                    None => unmapped.clone(),
                }
            }
        }
    }

    /// Rereads the slot map in the background, unless a reread is running or
    /// one finished less than [`SLOT_MAP_MIN_AGE`] ago.
    fn reread_slot_map(&self) {
        let Breakers::Cluster {
            refreshing,
            refreshed_ms,
            epoch,
            ..
        } = &self.inner.breakers
        else {
            return;
        };
        let last = refreshed_ms.load(Ordering::Acquire);
        let now = epoch.elapsed().as_millis() as u64;
        if last != 0 && now.saturating_sub(last) < SLOT_MAP_MIN_AGE.as_millis() as u64 {
            return;
        }
        if refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.load_slot_map().await {
                tracing::debug!(error = %e, "could not read the Redis Cluster slot map");
            }
            if let Breakers::Cluster {
                refreshing,
                refreshed_ms,
                epoch,
                ..
            } = &this.inner.breakers
            {
                refreshed_ms.store(
                    (epoch.elapsed().as_millis() as u64).max(1),
                    Ordering::Release,
                );
                refreshing.store(false, Ordering::Release);
            }
        });
    }

    /// Reads `CLUSTER SLOTS` and installs the map; a master seen before keeps its
    /// guard (and so its breaker's state).
    async fn load_slot_map(&self) -> Result<(), StoreError> {
        let Breakers::Cluster { map, .. } = &self.inner.breakers else {
            return Ok(());
        };
        let reply: Value = tokio::time::timeout(self.inner.timeout, async {
            let mut conn = self.connection().await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut conn)
                .await
                .map_err(StoreError::from)
        })
        .await
        .map_err(|_| StoreError::Unavailable(Dependency::Redis))??;
        let ranges = parse_cluster_slots(&reply)
            .ok_or_else(|| StoreError::Corrupt("unexpected CLUSTER SLOTS reply".into()))?;
        let old = read(map).clone();
        let mut next = SlotMap {
            owner: vec![u16::MAX; SLOTS],
            nodes: Vec::new(),
        };
        for (start, end, node) in ranges {
            let index = match next.nodes.iter().position(|(n, _)| *n == node) {
                Some(i) => i,
                None => {
                    let guard = old
                        .nodes
                        .iter()
                        .find(|(n, _)| *n == node)
                        .map(|(_, g)| g.clone())
                        .unwrap_or_else(|| {
                            Arc::new(Guard::new(Dependency::Redis, self.inner.timeout))
                        });
                    next.nodes.push((node, guard));
                    next.nodes.len() - 1
                }
            };
            let index = u16::try_from(index).unwrap_or(u16::MAX);
            for slot in start..=end.min(SLOTS - 1) {
                next.owner[slot] = index;
            }
        }
        match map.write() {
            Ok(mut g) => *g = Arc::new(next),
            Err(p) => *p.into_inner() = Arc::new(next),
        }
        Ok(())
    }

    /// The shared connection, made on first use.
    async fn connection(&self) -> Result<Connection, StoreError> {
        self.connection_in(&self.inner.connection).await
    }

    /// The connection in `cell`, made on first use. Concurrent first calls wait
    /// for one attempt; a failed attempt leaves the cell empty for the next call.
    async fn connection_in(&self, cell: &OnceCell<Connection>) -> Result<Connection, StoreError> {
        let conn = cell
            .get_or_try_init(|| async {
                let timeout = self.inner.timeout;
                Ok::<_, StoreError>(match &self.inner.target {
                    Target::Cluster(client) => {
                        Connection::Cluster(client.get_async_connection().await?)
                    }
                    Target::Single(client) => Connection::Single(
                        ConnectionManager::new_with_config(
                            client.clone(),
                            ConnectionManagerConfig::new()
                                .set_connection_timeout(timeout)
                                .set_response_timeout(timeout)
                                .set_number_of_retries(1),
                        )
                        .await?,
                    ),
                })
            })
            .await?;
        Ok(conn.clone())
    }

    /// Runs `call` under the guard of `route`'s node; a failure that says the
    /// node is unavailable also has the slot map reread (a failover may be on).
    async fn guarded<T, F>(&self, route: &str, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let result = self.guard_for(route).run(call).await;
        if matches!(result, Err(StoreError::Unavailable(_))) {
            self.reread_slot_map();
        }
        result
    }

    /// Runs one command, whose keys are in `route`'s slot, under its node's guard.
    pub async fn query<T: FromRedisValue>(&self, route: &str, cmd: &Cmd) -> Result<T, StoreError> {
        self.guarded(route, async {
            let mut conn = self.connection().await?;
            cmd.query_async::<T>(&mut conn)
                .await
                .map_err(StoreError::from)
        })
        .await
    }

    /// Runs a pipeline (or MULTI/EXEC transaction) under the guard. In a cluster,
    /// all its keys must share `route`'s slot.
    pub async fn pipeline<T: FromRedisValue>(
        &self,
        route: &str,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        self.pipeline_on(&self.inner.connection, route, pipe).await
    }

    /// [`Self::pipeline`] for a pipeline that ends in `WAIT`, on a connection of
    /// its own (see `waiting_connection`).
    pub async fn pipeline_waiting<T: FromRedisValue>(
        &self,
        route: &str,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        self.pipeline_on(&self.inner.waiting_connection, route, pipe)
            .await
    }

    async fn pipeline_on<T: FromRedisValue>(
        &self,
        cell: &OnceCell<Connection>,
        route: &str,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        self.guarded(route, async {
            let mut conn = self.connection_in(cell).await?;
            pipe.query_async::<T>(&mut conn)
                .await
                .map_err(StoreError::from)
        })
        .await
    }

    /// Runs a Lua script, whose keys are in `route`'s slot, under its node's guard
    /// (EVALSHA, falling back to EVAL).
    pub async fn script<T: FromRedisValue>(
        &self,
        route: &str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.guarded(route, async {
            let mut conn = self.connection().await?;
            invocation
                .invoke_async::<T>(&mut conn)
                .await
                .map_err(StoreError::from)
        })
        .await
    }

    /// One round trip, for health checks: bounded by the timeout, and outside
    /// the breakers (a probe neither trips nor is short-circuited by them).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = tokio::time::timeout(self.inner.timeout, async {
            let mut conn = self.connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(StoreError::from)
        })
        .await
        .map_err(|_| StoreError::Unavailable(Dependency::Redis))?
        .map_err(|e| {
            if e.is_unavailable() {
                StoreError::Unavailable(Dependency::Redis)
            } else {
                e
            }
        })?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!("PING answered {pong:?}")))
        }
    }
}

fn read(map: &RwLock<Arc<SlotMap>>) -> Arc<SlotMap> {
    match map.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// `(first slot, last slot, "host:port" of the master)` per range of a `CLUSTER
/// SLOTS` reply; None if it is not shaped like one.
fn parse_cluster_slots(reply: &Value) -> Option<Vec<(usize, usize, String)>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let int = |v: &Value| match v {
        Value::Int(n) => usize::try_from(*n).ok(),
        _ => None,
    };
    ranges
        .iter()
        .map(|range| {
            let Value::Array(items) = range else {
                return None;
            };
            let (start, end) = (int(items.first()?)?, int(items.get(1)?)?);
            let Value::Array(master) = items.get(2)? else {
                return None;
            };
            let host = text(master.first()?)?;
            let port = int(master.get(1)?)?;
            Some((start, end, format!("{host}:{port}")))
        })
        .collect()
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of the key, or of its
/// hash tag (the part between the first `{` and the next `}`, if not empty).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // The reference value of CRC16/XMODEM, and slots `CLUSTER KEYSLOT` gives.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.following"), 3443);
        // An empty tag hashes the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn cluster_slots_replies_parse() {
        let node = |host: &str, port| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("10.0.0.2", 7001),
            ]),
        ]);
        assert_eq!(
            parse_cluster_slots(&reply),
            Some(vec![
                (0, 5460, "127.0.0.1:7000".to_owned()),
                (5461, 16383, "10.0.0.2:7001".to_owned())
            ])
        );
        assert_eq!(parse_cluster_slots(&Value::Nil), None);
    }
}
