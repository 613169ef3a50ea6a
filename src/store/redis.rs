//! The one Redis handle the rest of the service uses: a Redis Cluster client or a
//! single-node connection manager behind the same calls.
//!
//! Both kinds connect lazily (a replica starts while Redis is down and connects
//! when it returns), reconnect by themselves, and every command runs through the
//! [`Guard`], so no request waits longer than the dependency timeout.

use std::{sync::Arc, time::Duration};

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
    guard: Guard,
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
        let target = if config.cluster {
            Target::Cluster(
                ClusterClientBuilder::new(urls)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    // Retries cover MOVED/ASK and failovers; the guard's timeout caps
                    // the total, so a few quick retries are all that fit anyway.
                    .retries(3)
                    .build()?,
            )
        } else {
            let url = urls.into_iter().next().ok_or_else(|| {
                StoreError::Redis(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "no Redis URL",
                )))
            })?;
            Target::Single(redis::Client::open(url)?)
        };
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                connection: OnceCell::new(),
                waiting_connection: OnceCell::new(),
                guard: Guard::new(Dependency::Redis, timeout),
            }),
        })
    }

    pub fn guard(&self) -> &Guard {
        &self.inner.guard
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
                let timeout = self.inner.guard.timeout();
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

    /// Runs one command under the guard.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.inner
            .guard
            .run(async {
                let mut conn = self.connection().await?;
                cmd.query_async::<T>(&mut conn)
                    .await
                    .map_err(StoreError::from)
            })
            .await
    }

    /// Runs a pipeline (or MULTI/EXEC transaction) under the guard. In a cluster,
    /// all its keys must share one slot.
    pub async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        self.pipeline_on(&self.inner.connection, pipe).await
    }

    /// [`Self::pipeline`] for a pipeline that ends in `WAIT`, on a connection of
    /// its own (see `waiting_connection`).
    pub async fn pipeline_waiting<T: FromRedisValue>(
        &self,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        self.pipeline_on(&self.inner.waiting_connection, pipe).await
    }

    async fn pipeline_on<T: FromRedisValue>(
        &self,
        cell: &OnceCell<Connection>,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        self.inner
            .guard
            .run(async {
                let mut conn = self.connection_in(cell).await?;
                pipe.query_async::<T>(&mut conn)
                    .await
                    .map_err(StoreError::from)
            })
            .await
    }

    /// Runs a Lua script under the guard (EVALSHA, falling back to EVAL).
    pub async fn script<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.inner
            .guard
            .run(async {
                let mut conn = self.connection().await?;
                invocation
                    .invoke_async::<T>(&mut conn)
                    .await
                    .map_err(StoreError::from)
            })
            .await
    }

    /// One round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = self.query(&redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!("PING answered {pong:?}")))
        }
    }
}
