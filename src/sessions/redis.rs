//! Sessions in Redis (Cluster or single node).
//!
//! Key layout — every key of one user carries the hash tag `{u:<user id>}`, so
//! they share a slot and scripts touching several of them stay atomic in a cluster:
//! - `auth:{u:<uid>}:s:<sid>`: HASH, the session (expires at its idle timeout,
//!   never later than its absolute end);
//! - `auth:{u:<uid>}:sessions`: SET of the user's session ids;
//! - `auth:{u:<uid>}:av`: the user's authorization version (see
//!   [`SessionStore::set_authz_version`]), read with the session on every check;
//! - `auth:{l:<subject>}:fails` / `:lock`: failed logins and the lockout of an
//!   account (`id:<uuid>`) or of a name that matches none (`name:<name>`);
//! - `auth:{ip:<addr>}:fails` / `:slow`: failed logins from one client IP this
//!   minute, and the next free turn of its slow lane.
//!
//! Durability: Redis acknowledges a write before its replica has it, so losing a
//! master could lose a session we already handed to a client. Writes that a client
//! is told about (create, rotate, revoke, authorization versions) are followed by
//! `WAIT 1` on the same node, bounded, so the acknowledgement normally means "on
//! two nodes".

use std::{collections::HashMap, sync::Arc};

use redis::{Script, Value};
use uuid::Uuid;

use super::{
    ip_slow_lane_interval_ms, Attempt, IpAdmission, LockoutPolicy, RefreshOutcome, Rotation,
    Session, SessionStore, AUTHZ_VERSION_TTL_MS, IP_SLOW_LANE_MAX_WAIT_MS, TOUCH_INTERVAL_MS,
};
use crate::store::{Redis, StoreError};

/// How long a write waits for a replica before we answer anyway.
const WAIT_REPLICA_MS: u64 = 200;
/// Used hashes of untagged (older releases') refresh tokens remembered per
/// session for reuse detection; tagged tokens need no history.
const USED_HISTORY: usize = 16;

// KEYS: session, index. ARGV: sid, ttl, index ttl, max sessions, session key
// prefix, then the session's fields and values.
const CREATE: &str = r"
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3], 'GT')
redis.call('PEXPIRE', KEYS[2], ARGV[3], 'NX')
local max = tonumber(ARGV[4])
local ids = redis.call('SMEMBERS', KEYS[2])
if #ids <= max then return 0 end
local live = {}
for _, id in ipairs(ids) do
  local created = redis.call('HGET', ARGV[5] .. id, 'created')
  if created then
    table.insert(live, {tonumber(created), id})
  else
    redis.call('SREM', KEYS[2], id)
  end
end
table.sort(live, function(a, b)
  if a[1] == b[1] then return a[2] < b[2] end
  return a[1] < b[1]
end)
local ended = 0
local excess = #live - max
for i = 1, #live do
  if ended >= excess then break end
  local id = live[i][2]
  if id ~= ARGV[1] then
    redis.call('DEL', ARGV[5] .. id)
    redis.call('SREM', KEYS[2], id)
    ended = ended + 1
  end
end
return ended
";

// KEYS: session, authorization version. ARGV: now, idle_ms, touch interval.
const CHECK: &str = r"
local v = redis.call('HMGET', KEYS[1], 'last_used', 'expires')
if not v[1] then return {0, 0} end
local now = tonumber(ARGV[1])
local expires = tonumber(v[2])
if expires <= now then
  redis.call('DEL', KEYS[1])
  return {0, 0}
end
if now - tonumber(v[1]) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.min(tonumber(ARGV[2]), expires - now))
end
return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
";

// KEYS: session, index, authorization version. ARGV: presented, replacement, now,
// grace_ms, idle_ms, sid, history, authentic (1 or 0).
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
local av = redis.call('GET', KEYS[3]) or '0'
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
  return {'rotated', redis.call('HGETALL', KEYS[1]), av}
end
local grace = tonumber(ARGV[4])
if grace > 0 and has(v[2], ARGV[1]) and now - tonumber(v[3] or '0') <= grace then
  redis.call('HSET', KEYS[1], 'rt', v[1] .. ',' .. ARGV[2], 'last_used', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {'grace', redis.call('HGETALL', KEYS[1]), av}
end
if ARGV[8] == '1' or has(v[5], ARGV[1]) or has(v[2], ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[6])
  return {'reused'}
end
return {'unknown'}
";

// HSET on a vanished key would resurrect a revoked session without a TTL, so
// fields are written only while the session exists. ARGV: field, value, ...
const UPDATE_IF_EXISTS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
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

// KEYS: authorization version. ARGV: version, ttl. Raises, never lowers.
const SET_AUTHZ_VERSION: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
";

// KEYS: fails, lock. ARGV: window_ms, threshold, base lock ms. The count is only
// known here, so the doubling repeats the formula of `super::lockout_ms`.
const RESERVE_ATTEMPT: &str = r"
local locked = redis.call('PTTL', KEYS[2])
if locked > 0 then return {0, locked} end
local n = redis.call('INCR', KEYS[1])
local window = tonumber(ARGV[1])
local threshold = tonumber(ARGV[2])
local base = tonumber(ARGV[3])
local lock = 0
if n >= threshold then
  lock = math.floor(math.min(base * (2 ^ math.min(n - threshold, 20)), math.max(window, base)))
  redis.call('SET', KEYS[2], '1', 'PX', lock)
end
redis.call('PEXPIRE', KEYS[1], window + lock)
return {1, lock}
";

const IP_FAIL: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], 60000) end
return n
";

// KEYS: fails, slow lane. ARGV: now, limit, interval, max wait. Returns {0, 0}
// (go), {1, wait} (go after wait) or {2, retry} (refused).
const IP_ADMIT: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n < tonumber(ARGV[2]) then return {0, 0} end
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local turn = math.max(now, tonumber(redis.call('GET', KEYS[2]) or '0'))
local wait = turn - now
if wait > max_wait then return {2, wait - max_wait} end
redis.call('SET', KEYS[2], turn + interval, 'PX', wait + interval + 60000)
return {1, wait}
";

/// The Redis session store. Cheap to clone: it sits in the application state,
/// which request extractors and middleware clone several times per request.
#[derive(Clone)]
pub struct RedisSessions {
    redis: Redis,
    /// Replicas a write waits for (0: single node without replicas).
    wait_replicas: u32,
    /// Shared, not owned: a `Script` holds its source and hash as `String`s, so
    /// owning several of them made every clone of the state allocate and copy.
    scripts: Arc<Scripts>,
}

struct Scripts {
    check: Script,
    update_if_exists: Script,
    reserve_attempt: Script,
    ip_fail: Script,
    ip_admit: Script,
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

fn authz_key(user_id: Uuid) -> String {
    format!("auth:{{u:{}}}:av", user_id.simple())
}

fn lockout_keys(subject: &str) -> (String, String) {
    (
        format!("auth:{{l:{subject}}}:fails"),
        format!("auth:{{l:{subject}}}:lock"),
    )
}

fn ip_keys(ip: &str) -> (String, String) {
    (
        format!("auth:{{ip:{ip}}}:fails"),
        format!("auth:{{ip:{ip}}}:slow"),
    )
}

impl RedisSessions {
    pub fn new(redis: Redis, wait_replicas: u32) -> Self {
        Self {
            redis,
            wait_replicas,
            scripts: Arc::new(Scripts {
                check: Script::new(CHECK),
                update_if_exists: Script::new(UPDATE_IF_EXISTS),
                reserve_attempt: Script::new(RESERVE_ATTEMPT),
                ip_fail: Script::new(IP_FAIL),
                ip_admit: Script::new(IP_ADMIT),
            }),
        }
    }

    /// Runs `EVAL script` with `keys` and `args`, followed by the optional WAIT,
    /// and returns the script's reply. EVAL (not EVALSHA) inside the pipeline, so
    /// WAIT can follow on the same node without a NOSCRIPT round trip. `keys`
    /// must share one slot; the first routes the call.
    async fn eval_durable(
        &self,
        script: &str,
        keys: &[&str],
        args: &[String],
    ) -> Result<Value, StoreError> {
        let route = keys.first().copied().unwrap_or_default();
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(script)
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        let values = self.run_durable(route, &mut pipe).await?;
        values
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt("no script reply".into()))
    }

    /// Runs a pipeline whose commands all touch `route`'s slot, followed by
    /// `WAIT` on the node that took the writes; warns when no replica confirmed.
    /// With WAIT it goes over the connection kept for that, so validations on the
    /// same node do not queue behind it. Returns the replies before WAIT's.
    async fn run_durable(
        &self,
        route: &str,
        pipe: &mut redis::Pipeline,
    ) -> Result<Vec<Value>, StoreError> {
        if self.wait_replicas == 0 {
            return self.redis.pipeline(route, pipe).await;
        }
        pipe.cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(WAIT_REPLICA_MS);
        let mut values: Vec<Value> = self.redis.pipeline_waiting(route, pipe).await?;
        if let Some(Value::Int(acked)) = values.pop() {
            if acked < i64::from(self.wait_replicas) {
                tracing::warn!(acked, "session write not yet confirmed by a replica");
            }
        }
        Ok(values)
    }
}

/// A session read back from its hash. Every field a session is written with must
/// be there and parse: a session that does not is refused as corrupt, never
/// filled in with defaults. `av` and `pwd` may be absent (sessions of releases
/// that did not write them: version 0, no epoch).
fn parse_session(fields: &HashMap<String, String>) -> Result<Session, StoreError> {
    let corrupt = |k: &str| StoreError::Corrupt(format!("session field {k}"));
    let get = |k: &str| fields.get(k).ok_or_else(|| corrupt(k));
    let int = |k: &str| get(k)?.parse::<i64>().map_err(|_| corrupt(k));
    let list = |k: &str| serde_json::from_str::<Vec<String>>(get(k)?).map_err(|_| corrupt(k));
    let uuid = |k: &str| Uuid::try_parse(get(k)?).map_err(|_| corrupt(k));
    let optional = |k: &str| fields.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(Session {
        id: uuid("sid")?,
        user_id: uuid("uid")?,
        username: get("username")?.clone(),
        roles: list("roles")?,
        permissions: list("perms")?,
        authz_version: match fields.get("av") {
            None => 0,
            Some(v) => v.parse().map_err(|_| corrupt("av"))?,
        },
        password_epoch: match optional("pwd") {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| corrupt("pwd"))?),
        },
        created_at: int("created")?,
        last_used_at: int("last_used")?,
        expires_at: int("expires")?,
        client_ip: optional("ip"),
        user_agent: optional("ua"),
        generation: u64::try_from(int("gen")?).map_err(|_| corrupt("gen"))?,
    })
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

/// The identity snapshot's fields, as written by create and update_identity.
fn identity_fields(s: &Session) -> [(&'static str, String); 5] {
    [
        ("username", s.username.clone()),
        ("roles", json_list(&s.roles)),
        ("perms", json_list(&s.permissions)),
        ("av", s.authz_version.to_string()),
        (
            "pwd",
            s.password_epoch.map(|e| e.to_string()).unwrap_or_default(),
        ),
    ]
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

/// The `{verdict, value}` pair the lockout and admission scripts answer.
fn pair(value: &Value) -> Result<(i64, i64), StoreError> {
    redis::from_redis_value(value)
        .map_err(|_| StoreError::Corrupt("unexpected script reply".into()))
}

impl SessionStore for RedisSessions {
    async fn create(
        &self,
        s: &Session,
        refresh_hash: &str,
        idle_ms: i64,
        max_sessions: u64,
    ) -> Result<u64, StoreError> {
        let key = session_key(s.user_id, s.id);
        let index = index_key(s.user_id);
        let ttl = idle_ms.min(s.expires_at - s.created_at).max(1);
        // The index lives as long as the longest session it could list.
        let index_ttl = (s.expires_at - s.created_at).max(1);
        let mut args = vec![
            s.id.simple().to_string(),
            ttl.to_string(),
            index_ttl.to_string(),
            max_sessions.max(1).to_string(),
            session_prefix(s.user_id),
        ];
        let fields = [
            ("uid", s.user_id.to_string()),
            ("sid", s.id.to_string()),
            ("created", s.created_at.to_string()),
            ("last_used", s.last_used_at.to_string()),
            ("expires", s.expires_at.to_string()),
            ("ip", s.client_ip.clone().unwrap_or_default()),
            ("ua", s.user_agent.clone().unwrap_or_default()),
            ("gen", s.generation.to_string()),
            ("rt", refresh_hash.to_owned()),
        ];
        for (field, value) in fields.into_iter().chain(identity_fields(s)) {
            args.push(field.to_owned());
            args.push(value);
        }
        let ended = self.eval_durable(CREATE, &[&key, &index], &args).await?;
        Ok(match ended {
            Value::Int(n) => u64::try_from(n).unwrap_or(0),
            _ => 0,
        })
    }

    async fn check(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        let key = session_key(user_id, session_id);
        let authz = authz_key(user_id);
        // Most checks only read: the idle timer moves at most once per
        // TOUCH_INTERVAL_MS, so a plain HMGET (and GET of the user's
        // authorization version, in the same round trip) answers them, and the
        // CHECK script (which moves the timer, or deletes an expired session,
        // atomically) runs only when it has something to write, as in the
        // embedded store. Redis spends ~1 µs on an HMGET against ~9 µs on the
        // script, and validations are most of its work.
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(&key)
            .arg("last_used")
            .arg("expires")
            .cmd("GET")
            .arg(&authz);
        let ((last_used, expires), version): ((Option<String>, Option<String>), Option<u64>) =
            self.redis.pipeline(&key, &pipe).await?;
        let Some(last_used) = last_used else {
            return Ok(None);
        };
        if let (Ok(last_used), Some(Ok(expires))) =
            (last_used.parse::<i64>(), expires.map(|e| e.parse::<i64>()))
        {
            // The script's "alive, nothing to write" case.
            if expires > now_ms && now_ms - last_used < TOUCH_INTERVAL_MS {
                return Ok(Some(version.unwrap_or(0)));
            }
        }
        let mut invocation = self.scripts.check.key(&key);
        invocation
            .key(&authz)
            .arg(now_ms)
            .arg(idle_ms)
            .arg(TOUCH_INTERVAL_MS);
        let (alive, version): (i64, u64) = self.redis.script(&key, &invocation).await?;
        Ok((alive == 1).then_some(version))
    }

    async fn rotate_refresh(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        r: &Rotation<'_>,
    ) -> Result<RefreshOutcome, StoreError> {
        let (key, index, authz) = (
            session_key(user_id, session_id),
            index_key(user_id),
            authz_key(user_id),
        );
        let args = [
            r.presented_hash.to_owned(),
            r.replacement_hash.to_owned(),
            r.now_ms.to_string(),
            r.grace_ms.to_string(),
            r.idle_ms.to_string(),
            session_id.simple().to_string(),
            USED_HISTORY.to_string(),
            u8::from(r.authentic).to_string(),
        ];
        let reply = self
            .eval_durable(ROTATE, &[&key, &index, &authz], &args)
            .await?;
        let Value::Array(reply) = reply else {
            return Err(StoreError::Corrupt("unexpected rotate reply".into()));
        };
        let verdict = reply
            .first()
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .unwrap_or_default();
        let rotated = || -> Result<(Session, u64), StoreError> {
            let session = parse_session(&as_fields(
                reply
                    .get(1)
                    .ok_or_else(|| StoreError::Corrupt("no session".into()))?,
            ))?;
            let version = reply
                .get(2)
                .and_then(|v| redis::from_redis_value::<u64>(v).ok())
                .ok_or_else(|| StoreError::Corrupt("authorization version".into()))?;
            Ok((session, version))
        };
        Ok(match verdict.as_str() {
            "rotated" => {
                let (session, authz_version) = rotated()?;
                RefreshOutcome::Rotated {
                    session,
                    authz_version,
                }
            }
            "grace" => {
                let (session, authz_version) = rotated()?;
                RefreshOutcome::Grace {
                    session,
                    authz_version,
                }
            }
            "reused" => RefreshOutcome::Reused,
            _ => RefreshOutcome::Unknown,
        })
    }

    async fn update_identity(&self, s: &Session) -> Result<(), StoreError> {
        let key = session_key(s.user_id, s.id);
        let mut invocation = self.scripts.update_if_exists.key(&key);
        for (field, value) in identity_fields(s) {
            invocation.arg(field).arg(value);
        }
        let _: i64 = self.redis.script(&key, &invocation).await?;
        Ok(())
    }

    async fn set_password_epoch(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        password_epoch: i64,
    ) -> Result<(), StoreError> {
        let key = session_key(user_id, session_id);
        self.eval_durable(
            UPDATE_IF_EXISTS,
            &[&key],
            &["pwd".to_owned(), password_epoch.to_string()],
        )
        .await?;
        Ok(())
    }

    async fn set_authz_version(
        &self,
        user_id: Uuid,
        version: u64,
        _now_ms: i64,
    ) -> Result<(), StoreError> {
        self.eval_durable(
            SET_AUTHZ_VERSION,
            &[&authz_key(user_id)],
            &[version.to_string(), AUTHZ_VERSION_TTL_MS.to_string()],
        )
        .await?;
        Ok(())
    }

    async fn list(&self, user_id: Uuid, now_ms: i64) -> Result<Vec<Session>, StoreError> {
        let index = index_key(user_id);
        let ids: Vec<String> = self
            .redis
            .query(&index, redis::cmd("SMEMBERS").arg(&index))
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = session_prefix(user_id);
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(format!("{prefix}{id}"));
        }
        let all: Vec<HashMap<String, String>> = self.redis.pipeline(&index, &pipe).await?;
        let mut sessions = Vec::new();
        let mut stale = Vec::new();
        for (id, fields) in ids.iter().zip(all) {
            if fields.is_empty() {
                stale.push(id.clone());
                continue;
            }
            match parse_session(&fields)? {
                s if s.expires_at > now_ms => sessions.push(s),
                _ => stale.push(id.clone()),
            }
        }
        if !stale.is_empty() {
            // Expired sessions vanish by TTL; their index entries are tidied here.
            let _: Result<i64, _> = self
                .redis
                .query(&index, redis::cmd("SREM").arg(&index).arg(&stale))
                .await;
        }
        sessions.sort_by_key(|s| s.created_at);
        Ok(sessions)
    }

    async fn revoke(&self, user_id: Uuid, session_id: Uuid) -> Result<bool, StoreError> {
        let key = session_key(user_id, session_id);
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").ignore();
        pipe.cmd("DEL").arg(&key).ignore();
        pipe.cmd("SREM")
            .arg(index_key(user_id))
            .arg(session_id.simple().to_string())
            .ignore();
        pipe.cmd("EXEC");
        let values = self.run_durable(&key, &mut pipe).await?;
        // EXEC's reply: [DEL count, SREM count].
        let deleted = match values.first() {
            Some(Value::Array(results)) => matches!(results.first(), Some(Value::Int(1))),
            _ => false,
        };
        Ok(deleted)
    }

    async fn revoke_all(&self, user_id: Uuid, except: Option<Uuid>) -> Result<u64, StoreError> {
        let index = index_key(user_id);
        let args = [
            session_prefix(user_id),
            except.map(|id| id.simple().to_string()).unwrap_or_default(),
        ];
        Ok(
            match self.eval_durable(REVOKE_ALL, &[&index], &args).await? {
                Value::Int(n) => u64::try_from(n).unwrap_or(0),
                _ => 0,
            },
        )
    }

    async fn reserve_attempt(
        &self,
        subject: &str,
        _now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<Attempt, StoreError> {
        let (fails, lock) = lockout_keys(subject);
        let mut invocation = self.scripts.reserve_attempt.key(&fails);
        invocation
            .key(lock)
            .arg(policy.window_ms)
            .arg(policy.threshold)
            .arg(super::BASE_LOCKOUT_MS);
        let reply: Value = self.redis.script(&fails, &invocation).await?;
        Ok(match pair(&reply)? {
            (0, retry_ms) => Attempt::Locked { retry_ms },
            (_, lock_ms) => Attempt::Admitted {
                lock_ms: (lock_ms > 0).then_some(lock_ms),
            },
        })
    }

    async fn clear_login_failures(&self, subject: &str) -> Result<(), StoreError> {
        let (fails, lock) = lockout_keys(subject);
        let _: i64 = self
            .redis
            .query(&fails, redis::cmd("DEL").arg(&fails).arg(lock))
            .await?;
        Ok(())
    }

    async fn record_ip_failure(&self, client_ip: &str, _now_ms: i64) -> Result<(), StoreError> {
        let (fails, _) = ip_keys(client_ip);
        let invocation = self.scripts.ip_fail.key(&fails);
        let _: i64 = self.redis.script(&fails, &invocation).await?;
        Ok(())
    }

    async fn ip_admission(
        &self,
        client_ip: &str,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<IpAdmission, StoreError> {
        let (fails, slow) = ip_keys(client_ip);
        let mut invocation = self.scripts.ip_admit.key(&fails);
        invocation
            .key(slow)
            .arg(now_ms)
            .arg(policy.ip_limit)
            .arg(ip_slow_lane_interval_ms(policy))
            .arg(IP_SLOW_LANE_MAX_WAIT_MS);
        let reply: Value = self.redis.script(&fails, &invocation).await?;
        Ok(match pair(&reply)? {
            (0, _) => IpAdmission::Now,
            (1, wait) => IpAdmission::After(wait),
            (_, retry) => IpAdmission::Refused(retry),
        })
    }
}
