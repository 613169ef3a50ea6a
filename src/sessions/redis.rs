//! Sessions in Redis (Cluster or single node).
//!
//! Key layout — every key of one user carries the hash tag `{u:<user id>}`, so
//! they share a slot and scripts touching several of them stay atomic in a cluster:
//! - `auth:{u:<uid>}:s:<sid>`: HASH, the session (expires at its idle timeout,
//!   never later than its absolute end);
//! - `auth:{u:<uid>}:sessions`: SET of the user's session ids;
//! - `auth:{l:<username>}:fails` / `:lock`: failed-login count and lockout;
//! - `auth:{ip:<addr>}:fails`: failed logins from one client IP this minute.
//!
//! Durability: Redis acknowledges a write before its replica has it, so losing a
//! master could lose a session we already handed to a client. Writes that a client
//! is told about (create, rotate, revoke) are followed by `WAIT 1` on the same
//! node, bounded, so the acknowledgement normally means "on two nodes".

use std::{collections::HashMap, sync::Arc};

use redis::{Script, Value};
use uuid::Uuid;

use super::{LockoutPolicy, RefreshOutcome, Session, SessionStore, TOUCH_INTERVAL_MS};
use crate::store::{Redis, StoreError};

/// How long a write waits for a replica before we answer anyway.
const WAIT_REPLICA_MS: u64 = 200;
/// Used refresh-token hashes remembered per session for reuse detection.
const USED_HISTORY: usize = 16;

const CHECK: &str = r"
local v = redis.call('HMGET', KEYS[1], 'last_used', 'expires')
if not v[1] then return 0 end
local now = tonumber(ARGV[1])
local expires = tonumber(v[2])
if expires <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
if now - tonumber(v[1]) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.min(tonumber(ARGV[2]), expires - now))
end
return 1
";

// KEYS: session, index. ARGV: presented, replacement, now, grace_ms, idle_ms, sid, history.
const ROTATE: &str = r"
local v = redis.call('HMGET', KEYS[1], 'rt', 'prev', 'rotated_at', 'expires', 'used')
if not v[1] then return {'unknown'} end
local now = tonumber(ARGV[3])
local expires = tonumber(v[4])
if expires <= now then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[6])
  return {'unknown'}
end
local function has(list, h)
  for x in string.gmatch(list or '', '[^,]+') do
    if x == h then return true end
  end
  return false
end
local ttl = math.min(tonumber(ARGV[5]), expires - now)
if has(v[1], ARGV[1]) then
  local used = {}
  for x in string.gmatch((v[5] or '') .. ',' .. v[1], '[^,]+') do table.insert(used, x) end
  local keep = tonumber(ARGV[7])
  while #used > keep do table.remove(used, 1) end
  redis.call('HSET', KEYS[1], 'rt', ARGV[2], 'prev', v[1], 'rotated_at', ARGV[3],
    'last_used', ARGV[3], 'used', table.concat(used, ','))
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {'rotated', redis.call('HGETALL', KEYS[1])}
end
local grace = tonumber(ARGV[4])
if grace > 0 and has(v[2], ARGV[1]) and now - tonumber(v[3] or '0') <= grace then
  redis.call('HSET', KEYS[1], 'rt', v[1] .. ',' .. ARGV[2], 'last_used', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {'grace', redis.call('HGETALL', KEYS[1])}
end
if has(v[5], ARGV[1]) or has(v[2], ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[6])
  return {'reused'}
end
return {'unknown'}
";

// HSET on a vanished key would resurrect a revoked session without a TTL, so the
// identity snapshot is written only while the session exists.
const UPDATE_IDENTITY: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'username', ARGV[1], 'roles', ARGV[2], 'perms', ARGV[3])
end
return 1
";

// KEYS: index. ARGV: key prefix of the user's sessions, sid to keep ('' for none).
const REVOKE_ALL: &str = r"
local ids = redis.call('SMEMBERS', KEYS[1])
local n = 0
for _, id in ipairs(ids) do
  if id ~= ARGV[2] then
    n = n + redis.call('DEL', ARGV[1] .. id)
    redis.call('SREM', KEYS[1], id)
  end
end
return n
";

// KEYS: fails, lock. ARGV: window_ms, threshold, base lock ms. The count is only
// known here, so the doubling repeats the formula of `super::lockout_ms`.
const FAIL: &str = r"
local n = redis.call('INCR', KEYS[1])
local window = tonumber(ARGV[1])
local threshold = tonumber(ARGV[2])
local base = tonumber(ARGV[3])
local lock = 0
if n >= threshold then
  lock = math.min(base * (2 ^ math.min(n - threshold, 20)), math.max(window, base))
  redis.call('SET', KEYS[2], '1', 'PX', math.floor(lock))
end
redis.call('PEXPIRE', KEYS[1], window + math.floor(lock))
return math.floor(lock)
";

const IP_FAIL: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], 60000) end
return n
";

/// The Redis session store. Cheap to clone: it sits in the application state,
/// which request extractors and middleware clone several times per request.
#[derive(Clone)]
pub struct RedisSessions {
    redis: Redis,
    /// Replicas a write waits for (0: single node without replicas).
    wait_replicas: u32,
    /// Shared, not owned: a `Script` holds its source and hash as `String`s, so
    /// owning four of them made every clone of the state allocate and copy ~2 KiB.
    scripts: Arc<Scripts>,
}

struct Scripts {
    check: Script,
    update_identity: Script,
    fail: Script,
    ip_fail: Script,
}

fn session_key(user_id: Uuid, session_id: Uuid) -> String {
    format!("auth:{{u:{}}}:s:{}", user_id.simple(), session_id.simple())
}

fn session_prefix(user_id: Uuid) -> String {
    format!("auth:{{u:{}}}:s:", user_id.simple())
}

fn index_key(user_id: Uuid) -> String {
    format!("auth:{{u:{}}}:sessions", user_id.simple())
}

/// Usernames are case-insensitive, so their counters are too.
fn login_keys(username: &str) -> (String, String) {
    let name = username.to_lowercase();
    (
        format!("auth:{{l:{name}}}:fails"),
        format!("auth:{{l:{name}}}:lock"),
    )
}

fn ip_key(ip: &str) -> String {
    format!("auth:{{ip:{ip}}}:fails")
}

impl RedisSessions {
    pub fn new(redis: Redis, wait_replicas: u32) -> Self {
        Self {
            redis,
            wait_replicas,
            scripts: Arc::new(Scripts {
                check: Script::new(CHECK),
                update_identity: Script::new(UPDATE_IDENTITY),
                fail: Script::new(FAIL),
                ip_fail: Script::new(IP_FAIL),
            }),
        }
    }

    /// Appends `WAIT` to a pipeline whose other commands all touch one slot, so it
    /// runs on the node that took the write.
    fn with_wait(&self, pipe: &mut redis::Pipeline) {
        if self.wait_replicas > 0 {
            pipe.cmd("WAIT")
                .arg(self.wait_replicas)
                .arg(WAIT_REPLICA_MS);
        }
    }

    /// Runs a pipeline ending in the optional WAIT; warns when no replica confirmed.
    /// With WAIT it goes over the connection kept for that, so validations on the
    /// same node do not queue behind it.
    async fn run_durable(&self, pipe: &redis::Pipeline) -> Result<Vec<Value>, StoreError> {
        let values: Vec<Value> = if self.wait_replicas > 0 {
            self.redis.pipeline_waiting(pipe).await?
        } else {
            self.redis.pipeline(pipe).await?
        };
        if self.wait_replicas > 0 {
            if let Some(Value::Int(acked)) = values.last() {
                if *acked < i64::from(self.wait_replicas) {
                    tracing::warn!(acked, "session write not yet confirmed by a replica");
                }
            }
        }
        Ok(values)
    }
}

fn parse_session(fields: &HashMap<String, String>) -> Result<Session, StoreError> {
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let int = |k: &str| get(k).parse::<i64>().unwrap_or(0);
    let list = |k: &str| serde_json::from_str::<Vec<String>>(&get(k)).unwrap_or_default();
    let uuid = |k: &str| {
        Uuid::try_parse(&get(k)).map_err(|_| StoreError::Corrupt(format!("session field {k}")))
    };
    let optional = |k: &str| fields.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(Session {
        id: uuid("sid")?,
        user_id: uuid("uid")?,
        username: get("username"),
        roles: list("roles"),
        permissions: list("perms"),
        created_at: int("created"),
        last_used_at: int("last_used"),
        expires_at: int("expires"),
        client_ip: optional("ip"),
        user_agent: optional("ua"),
        generation: u64::try_from(int("gen")).unwrap_or(0),
    })
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

fn as_fields(value: &Value) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let items: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    };
    for pair in items.chunks(2) {
        if let [k, v] = pair {
            if let (Ok(k), Ok(v)) = (
                redis::from_redis_value::<String>(k),
                redis::from_redis_value::<String>(v),
            ) {
                map.insert(k, v);
            }
        }
    }
    map
}

impl SessionStore for RedisSessions {
    async fn create(
        &self,
        s: &Session,
        refresh_hash: &str,
        idle_ms: i64,
    ) -> Result<(), StoreError> {
        let key = session_key(s.user_id, s.id);
        let index = index_key(s.user_id);
        let ttl = idle_ms.min(s.expires_at - s.created_at).max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").ignore();
        pipe.cmd("HSET")
            .arg(&key)
            .arg(&[
                ("uid", s.user_id.to_string()),
                ("sid", s.id.to_string()),
                ("username", s.username.clone()),
                ("roles", json_list(&s.roles)),
                ("perms", json_list(&s.permissions)),
                ("created", s.created_at.to_string()),
                ("last_used", s.last_used_at.to_string()),
                ("expires", s.expires_at.to_string()),
                ("ip", s.client_ip.clone().unwrap_or_default()),
                ("ua", s.user_agent.clone().unwrap_or_default()),
                ("gen", s.generation.to_string()),
                ("rt", refresh_hash.to_owned()),
            ])
            .ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl).ignore();
        pipe.cmd("SADD")
            .arg(&index)
            .arg(s.id.simple().to_string())
            .ignore();
        // The index lives as long as the longest session it could list.
        pipe.cmd("PEXPIRE")
            .arg(&index)
            .arg((s.expires_at - s.created_at).max(1))
            .arg("GT")
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&index)
            .arg((s.expires_at - s.created_at).max(1))
            .arg("NX")
            .ignore();
        pipe.cmd("EXEC").ignore();
        self.with_wait(&mut pipe);
        self.run_durable(&pipe).await?;
        Ok(())
    }

    async fn check(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<bool, StoreError> {
        let key = session_key(user_id, session_id);
        // Most checks only read: the idle timer moves at most once per
        // TOUCH_INTERVAL_MS, so a plain HMGET answers them, and the CHECK script
        // (which moves the timer, or deletes an expired session, atomically) runs
        // only when it has something to write, as in the embedded store. Redis
        // spends ~1 µs on an HMGET against ~9 µs on the script, and validations
        // are most of its work.
        let (last_used, expires): (Option<String>, Option<String>) = self
            .redis
            .query(
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("last_used")
                    .arg("expires"),
            )
            .await?;
        let Some(last_used) = last_used else {
            return Ok(false);
        };
        if let (Ok(last_used), Some(Ok(expires))) =
            (last_used.parse::<i64>(), expires.map(|e| e.parse::<i64>()))
        {
            // The script's "alive, nothing to write" case.
            if expires > now_ms && now_ms - last_used < TOUCH_INTERVAL_MS {
                return Ok(true);
            }
        }
        let mut invocation = self.scripts.check.key(key);
        invocation.arg(now_ms).arg(idle_ms).arg(TOUCH_INTERVAL_MS);
        let alive: i64 = self.redis.script(&invocation).await?;
        Ok(alive == 1)
    }

    async fn rotate_refresh(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        presented_hash: &str,
        replacement_hash: &str,
        now_ms: i64,
        grace_ms: i64,
        idle_ms: i64,
    ) -> Result<RefreshOutcome, StoreError> {
        // EVAL (not EVALSHA) inside the pipeline, so WAIT can follow on the same
        // node without a NOSCRIPT round trip.
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(ROTATE)
            .arg(2)
            .arg(session_key(user_id, session_id))
            .arg(index_key(user_id))
            .arg(presented_hash)
            .arg(replacement_hash)
            .arg(now_ms)
            .arg(grace_ms)
            .arg(idle_ms)
            .arg(session_id.simple().to_string())
            .arg(USED_HISTORY);
        self.with_wait(&mut pipe);
        let values = self.run_durable(&pipe).await?;
        let Some(Value::Array(reply)) = values.first() else {
            return Err(StoreError::Corrupt("unexpected rotate reply".into()));
        };
        let verdict = reply
            .first()
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .unwrap_or_default();
        let session = || reply.get(1).map(as_fields).map(|f| parse_session(&f));
        Ok(match verdict.as_str() {
            "rotated" => RefreshOutcome::Rotated(
                session().ok_or_else(|| StoreError::Corrupt("no session".into()))??,
            ),
            "grace" => RefreshOutcome::Grace(
                session().ok_or_else(|| StoreError::Corrupt("no session".into()))??,
            ),
            "reused" => RefreshOutcome::Reused,
            _ => RefreshOutcome::Unknown,
        })
    }

    async fn update_identity(&self, s: &Session) -> Result<(), StoreError> {
        let key = session_key(s.user_id, s.id);
        let mut invocation = self.scripts.update_identity.key(key);
        invocation
            .arg(&s.username)
            .arg(json_list(&s.roles))
            .arg(json_list(&s.permissions));
        let _: i64 = self.redis.script(&invocation).await?;
        Ok(())
    }

    async fn list(&self, user_id: Uuid, now_ms: i64) -> Result<Vec<Session>, StoreError> {
        let index = index_key(user_id);
        let ids: Vec<String> = self.redis.query(redis::cmd("SMEMBERS").arg(&index)).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = session_prefix(user_id);
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(format!("{prefix}{id}"));
        }
        let all: Vec<HashMap<String, String>> = self.redis.pipeline(&pipe).await?;
        let mut sessions = Vec::new();
        let mut stale = Vec::new();
        for (id, fields) in ids.iter().zip(all) {
            match parse_session(&fields) {
                Ok(s) if s.expires_at > now_ms => sessions.push(s),
                _ => stale.push(id.clone()),
            }
        }
        if !stale.is_empty() {
            // Expired sessions vanish by TTL; their index entries are tidied here.
            let _: Result<i64, _> = self
                .redis
                .query(redis::cmd("SREM").arg(&index).arg(&stale))
                .await;
        }
        sessions.sort_by_key(|s| s.created_at);
        Ok(sessions)
    }

    async fn revoke(&self, user_id: Uuid, session_id: Uuid) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").ignore();
        pipe.cmd("DEL")
            .arg(session_key(user_id, session_id))
            .ignore();
        pipe.cmd("SREM")
            .arg(index_key(user_id))
            .arg(session_id.simple().to_string())
            .ignore();
        pipe.cmd("EXEC");
        self.with_wait(&mut pipe);
        let values = self.run_durable(&pipe).await?;
        // EXEC's reply: [DEL count, SREM count].
        let deleted = match values.first() {
            Some(Value::Array(results)) => matches!(results.first(), Some(Value::Int(1))),
            _ => false,
        };
        Ok(deleted)
    }

    async fn revoke_all(&self, user_id: Uuid, except: Option<Uuid>) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(REVOKE_ALL)
            .arg(1)
            .arg(index_key(user_id))
            .arg(session_prefix(user_id))
            .arg(except.map(|id| id.simple().to_string()).unwrap_or_default());
        self.with_wait(&mut pipe);
        let values = self.run_durable(&pipe).await?;
        Ok(match values.first() {
            Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        })
    }

    async fn login_lock(&self, username: &str, _now_ms: i64) -> Result<Option<i64>, StoreError> {
        let (_, lock) = login_keys(username);
        let ttl: i64 = self.redis.query(redis::cmd("PTTL").arg(lock)).await?;
        Ok((ttl > 0).then_some(ttl))
    }

    async fn record_login_failure(
        &self,
        username: &str,
        client_ip: Option<&str>,
        _now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<Option<i64>, StoreError> {
        let (fails, lock) = login_keys(username);
        let mut invocation = self.scripts.fail.key(fails);
        invocation
            .key(lock)
            .arg(policy.window_ms)
            .arg(policy.threshold)
            .arg(super::BASE_LOCKOUT_MS);
        let lock_ms: i64 = self.redis.script(&invocation).await?;
        if let Some(ip) = client_ip {
            let invocation = self.scripts.ip_fail.key(ip_key(ip));
            let _: i64 = self.redis.script(&invocation).await?;
        }
        Ok((lock_ms > 0).then_some(lock_ms))
    }

    async fn clear_login_failures(&self, username: &str) -> Result<(), StoreError> {
        let (fails, lock) = login_keys(username);
        let _: i64 = self
            .redis
            .query(redis::cmd("DEL").arg(fails).arg(lock))
            .await?;
        Ok(())
    }

    async fn ip_failures(&self, client_ip: &str, _now_ms: i64) -> Result<(u64, i64), StoreError> {
        let key = ip_key(client_ip);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let (count, ttl): (Option<u64>, i64) = self.redis.pipeline(&pipe).await?;
        Ok((count.unwrap_or(0), ttl.max(0)))
    }
}
