//! The load: virtual users that behave like apps, and a record of every request.
//!
//! A steady user logs in once, then loops: mostly validations (as a gateway would,
//! alternating `GET /v1/auth/validate` and the forward-auth endpoint), sometimes a
//! refresh, now and then a new login that logs the previous session out. Each one
//! has its own `reqwest::Client`, so its own keep-alive connection to the load
//! balancer, as separate apps would. No request is retried by the drill: a failed
//! request is counted, and only then does the user carry on (a failed refresh is
//! tried again with the same refresh token, as a real client would).
//!
//! A session is *lost* when a credential the service handed out in a successful
//! answer, and that the user has not given up, is refused (401): a validation of
//! the current access token, a refresh with the current refresh token, or the
//! logout of the previous session. Each loss is recorded once, with the moment
//! the credential was acknowledged and whether an earlier refresh with it had
//! failed without an answer (when the service may have rotated the token without
//! the client hearing of it).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tokio::{sync::watch, task::JoinHandle};

/// What a request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Login,
    Refresh,
    Validate,
    ForwardAuth,
    Logout,
    /// A login of the login storm.
    StormLogin,
    /// A validation through the replica with the strict outage policy.
    StrictValidate,
    /// Re-validating tokens handed out earlier (after the storm, at the end).
    Recheck,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::Refresh => "refresh",
            Self::Validate => "validate",
            Self::ForwardAuth => "forward-auth",
            Self::Logout => "logout",
            Self::StormLogin => "storm login",
            Self::StrictValidate => "validate (strict)",
            Self::Recheck => "re-validate",
        }
    }

    /// Validations of every kind, the requests whose latency gateways feel.
    pub fn is_validation(self) -> bool {
        matches!(
            self,
            Self::Validate | Self::ForwardAuth | Self::StrictValidate | Self::Recheck
        )
    }
}

/// Which HAProxy frontend a request went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// HTTP (L7), like an ingress controller or a load balancer that checks pods.
    Main = 0,
    /// HTTP with retries of refused connections, like a service mesh.
    Mesh = 1,
    /// HTTP, to the strict-policy replica.
    Strict = 2,
    /// TCP (L4), like kube-proxy: a client's connection stays on one replica.
    L4 = 3,
}

/// A session refused although the service had handed out its credential.
#[derive(Debug, Clone, Copy)]
pub struct LostSession {
    /// When the refused credential was acknowledged (ms since the drill began).
    pub acked_at: f64,
    /// An earlier refresh with this refresh token got no answer.
    pub after_failed_refresh: bool,
}

tokio::task_local! {
    /// The steady user a task plays (1-based), for the events' `who`.
    static WHO: u32;
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Event {
    /// The steady user who sent it (1-based); 0 for other tasks.
    pub who: u32,
    pub op: Op,
    pub via: Via,
    /// Milliseconds since the drill began.
    pub start: f64,
    pub end: f64,
    /// HTTP status; 0 when no answer came (connection error, reset, timeout).
    pub status: u16,
    pub retry_after: bool,
    /// For anything but 2xx: the problem `code`, or the transport error.
    pub detail: Option<String>,
    /// The replica that answered (HAProxy's `X-Drill-Server`).
    pub server: Option<String>,
    pub lost: Option<LostSession>,
}

impl Event {
    pub fn ms(&self) -> f64 {
        self.end - self.start
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Every request, and the ones still running.
pub struct Recorder {
    t0: Instant,
    events: Mutex<Vec<Event>>,
    outstanding: Mutex<BTreeMap<u64, f64>>,
    next_id: AtomicU64,
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            t0: Instant::now(),
            events: Mutex::new(Vec::new()),
            outstanding: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Milliseconds since the drill began.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }

    fn begin(&self) -> (u64, f64) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let start = self.now();
        if let Ok(mut o) = self.outstanding.lock() {
            o.insert(id, start);
        }
        (id, start)
    }

    fn finish(&self, id: u64, event: Event) {
        if let Ok(mut o) = self.outstanding.lock() {
            o.remove(&id);
        }
        if let Ok(mut e) = self.events.lock() {
            e.push(event);
        }
    }

    /// Requests sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.outstanding.lock().map(|o| o.len()).unwrap_or(0)
    }

    /// Waits until every request started before `before` has finished.
    pub async fn settle(&self, before: f64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let pending = self
                .outstanding
                .lock()
                .map(|o| o.values().any(|&s| s < before))
                .unwrap_or(false);
            if !pending {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every request as CSV, for a closer look after a run.
    pub fn write_csv(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(
            out,
            "start_ms,end_ms,op,via,status,retry_after,server,lost,detail"
        )?;
        let events = self.events.lock().map(|e| e.clone()).unwrap_or_default();
        for e in events {
            writeln!(
                out,
                "{:.1},{:.1},{},{},{:?},{},{},{},{},\"{}\"",
                e.start,
                e.end,
                e.who,
                e.op.name(),
                e.via,
                e.status,
                e.retry_after,
                e.server.as_deref().unwrap_or(""),
                match e.lost {
                    None => "",
                    Some(l) if l.after_failed_refresh => "after-unanswered-refresh",
                    Some(_) => "lost",
                },
                e.detail.as_deref().unwrap_or("").replace('"', "'")
            )?;
        }
        out.flush()
    }

    /// Requests started in `[from, to)`.
    pub fn window(&self, from: f64, to: f64) -> Vec<Event> {
        self.events
            .lock()
            .map(|e| {
                e.iter()
                    .filter(|ev| ev.start >= from && ev.start < to)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A small xorshift generator: think times and operation mix need no crypto.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Self {
        let seed = u64::from_le_bytes(
            uuid::Uuid::new_v4().as_bytes()[..8]
                .try_into()
                .unwrap_or([7; 8]),
        );
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi.saturating_sub(lo) + 1)
    }
}

/// A user account created for the drill.
#[derive(Debug, Clone)]
pub struct User {
    pub username: String,
    pub password: String,
}

/// A session as the client holds it.
#[derive(Debug, Clone)]
pub struct Session {
    pub access: String,
    pub refresh: String,
    pub acked_at: f64,
    /// A refresh with `refresh` was sent and got no answer.
    pub uncertain: bool,
}

impl Session {
    fn lost(&self) -> LostSession {
        LostSession {
            acked_at: self.acked_at,
            after_failed_refresh: self.uncertain,
        }
    }
}

/// The base URLs of the frontends, and whether steady users go through the mesh.
pub struct Target {
    urls: [String; 4],
    mesh: AtomicU8,
}

impl Target {
    pub fn new(frontends: crate::haproxy::Frontends) -> Self {
        let f = frontends;
        Self {
            urls: [f.main, f.mesh, f.strict, f.l4].map(|p| format!("http://127.0.0.1:{p}")),
            mesh: AtomicU8::new(0),
        }
    }

    pub fn url(&self, via: Via) -> &str {
        &self.urls[via as usize]
    }

    /// Sends every steady user through the mesh frontend (or back to its own).
    pub fn use_mesh(&self, on: bool) {
        self.mesh.store(u8::from(on), Ordering::Relaxed);
    }

    /// The frontend for a steady user whose own frontend is `home`.
    fn steady(&self, home: Via) -> Via {
        if self.mesh.load(Ordering::Relaxed) == 1 {
            Via::Mesh
        } else {
            home
        }
    }
}

/// What one request got back.
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Option<Value>,
    pub detail: Option<String>,
    pub server: Option<String>,
}

fn error_chain(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = if e.is_timeout() {
        "timeout".to_owned()
    } else {
        e.to_string()
    };
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub async fn send(req: reqwest::RequestBuilder) -> Reply {
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let server = resp
                .headers()
                .get("x-drill-server")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match resp.bytes().await {
                Ok(bytes) => {
                    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
                    // "code: detail" of a problem document, or the start of
                    // whatever else came back (HAProxy's own 503 page).
                    let detail = (!(200..300).contains(&status)).then(|| {
                        let field = |k: &str| {
                            body.as_ref()
                                .and_then(|b| b.get(k))
                                .and_then(Value::as_str)
                                .map(str::to_owned)
                        };
                        match (field("code"), field("detail")) {
                            (Some(c), Some(d)) => format!("{c}: {d}"),
                            (Some(c), None) => c,
                            _ => String::from_utf8_lossy(&bytes)
                                .chars()
                                .take(60)
                                .collect::<String>()
                                .replace('\n', " "),
                        }
                    });
                    Reply {
                        status,
                        retry_after,
                        body,
                        detail,
                        server,
                    }
                }
                Err(e) => Reply {
                    status: 0,
                    retry_after: None,
                    body: None,
                    detail: Some(format!("reading the body: {}", error_chain(&e))),
                    server,
                },
            }
        }
        Err(e) => Reply {
            status: 0,
            retry_after: None,
            body: None,
            detail: Some(error_chain(&e)),
            server: None,
        },
    }
}

/// A client with its own keep-alive connection(s).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        // Shorter than HAProxy's `timeout http-keep-alive` (60 s): see haproxy.rs.
        .pool_idle_timeout(Duration::from_secs(20))
        .connect_timeout(Duration::from_secs(2))
        // The service's own request timeout is 10 s; anything longer is a hang.
        .timeout(Duration::from_secs(12))
        .build()
        .unwrap_or_default()
}

/// Sends one request and records it; `lost` is decided from the reply.
async fn recorded(
    rec: &Recorder,
    op: Op,
    via: Via,
    req: reqwest::RequestBuilder,
    lost: impl FnOnce(&Reply) -> Option<LostSession>,
) -> Reply {
    let (id, start) = rec.begin();
    let reply = send(req).await;
    let lost = lost(&reply);
    rec.finish(
        id,
        Event {
            who: WHO.try_with(|w| *w).unwrap_or(0),
            op,
            via,
            start,
            end: rec.now(),
            status: reply.status,
            retry_after: reply.retry_after.is_some(),
            detail: reply.detail.clone(),
            server: reply.server.clone(),
            lost,
        },
    );
    reply
}

fn session_from(reply: &Reply, now: f64) -> Option<Session> {
    let body = reply.body.as_ref()?;
    Some(Session {
        access: body.get("access_token")?.as_str()?.to_owned(),
        refresh: body.get("refresh_token")?.as_str()?.to_owned(),
        acked_at: now,
        uncertain: false,
    })
}

/// The pause a client takes after a failure: Retry-After (capped at 1 s, the
/// service's value), or half a second.
fn backoff(reply: &Reply) -> Duration {
    Duration::from_millis(reply.retry_after.map_or(500, |s| (s * 1000).min(1000)))
}

/// Shared by every task of the load.
pub struct Load {
    pub rec: Arc<Recorder>,
    pub target: Arc<Target>,
}

pub async fn login(load: &Load, client: &reqwest::Client, op: Op, via: Via, user: &User) -> Reply {
    let req = client
        .post(format!("{}/v1/auth/login", load.target.url(via)))
        .json(&json!({"username": user.username, "password": user.password}));
    recorded(&load.rec, op, via, req, |_| None).await
}

/// Validates `session`'s access token; a 401 is a lost session.
pub async fn validate(
    load: &Load,
    client: &reqwest::Client,
    op: Op,
    via: Via,
    session: &Session,
) -> Reply {
    let path = match op {
        // Envoy's ext_authz with path_prefix forwards the original path.
        Op::ForwardAuth => "/v1/auth/forward-auth/orders/42",
        _ => "/v1/auth/validate",
    };
    let req = client
        .get(format!("{}{path}", load.target.url(via)))
        .bearer_auth(&session.access);
    recorded(&load.rec, op, via, req, |r| {
        (r.status == 401).then(|| session.lost())
    })
    .await
}

/// Operation mix and pace of a steady user.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub think_ms: (u64, u64),
    pub validate: f64,
    pub refresh: f64,
    // The rest: a new login, then logout of the previous session.
}

/// A group of tasks stopped together.
pub struct Crowd {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Option<Session>>>,
}

impl Crowd {
    /// Stops every task after its current request; returns the sessions they held.
    pub async fn stop(self) -> Vec<Session> {
        let _ = self.stop.send(true);
        let mut sessions = Vec::new();
        for t in self.tasks {
            if let Ok(Some(s)) = t.await {
                sessions.push(s);
            }
        }
        sessions
    }
}

/// Sleeps `d` unless the crowd is being stopped; false when stopping.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

/// Starts one steady user per account; half of them go through the HTTP
/// frontend, half through the TCP one.
pub fn steady(load: &Arc<Load>, users: &[User], mix: Mix) -> Crowd {
    let (stop, rx) = watch::channel(false);
    let tasks = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let load = load.clone();
            let user = u.clone();
            let rx = rx.clone();
            let home = if i % 2 == 0 { Via::Main } else { Via::L4 };
            let who = u32::try_from(i + 1).unwrap_or(u32::MAX);
            tokio::spawn(WHO.scope(who, steady_user(load, user, home, mix, rx)))
        })
        .collect();
    Crowd { stop, tasks }
}

async fn steady_user(
    load: Arc<Load>,
    user: User,
    home: Via,
    mix: Mix,
    mut stop: watch::Receiver<bool>,
) -> Option<Session> {
    let client = client();
    let mut rng = Rng::new();
    let mut session: Option<Session> = None;
    let mut retry_refresh = false;
    let mut forward = false;
    loop {
        let via = load.target.steady(home);
        let mut wait = Duration::from_millis(rng.between(mix.think_ms.0, mix.think_ms.1));
        match session.take() {
            None => {
                let r = login(&load, &client, Op::Login, via, &user).await;
                session = session_from(&r, load.rec.now());
                if session.is_none() {
                    wait = backoff(&r);
                }
            }
            Some(mut s) => {
                let dice = rng.unit();
                if retry_refresh || (dice >= mix.validate && dice < mix.validate + mix.refresh) {
                    let req = client
                        .post(format!("{}/v1/auth/refresh", load.target.url(via)))
                        .json(&json!({"refresh_token": s.refresh}));
                    let r = recorded(&load.rec, Op::Refresh, via, req, |r| {
                        (r.status == 401).then(|| s.lost())
                    })
                    .await;
                    retry_refresh = false;
                    if r.status == 200 {
                        session = session_from(&r, load.rec.now());
                    } else if r.status == 401 {
                        session = None;
                    } else {
                        // No answer, or 5xx: the token may or may not have been
                        // rotated. Try again with it, like a client would.
                        if r.status == 0 || r.status >= 500 {
                            s.uncertain = true;
                        }
                        retry_refresh = true;
                        wait = backoff(&r);
                        session = Some(s);
                    }
                } else if dice < mix.validate {
                    forward = !forward;
                    let op = if forward {
                        Op::ForwardAuth
                    } else {
                        Op::Validate
                    };
                    let r = validate(&load, &client, op, via, &s).await;
                    if r.status == 401 {
                        session = None;
                    } else {
                        if !(200..300).contains(&r.status) {
                            wait = backoff(&r);
                        }
                        session = Some(s);
                    }
                } else {
                    let r = login(&load, &client, Op::Login, via, &user).await;
                    match session_from(&r, load.rec.now()) {
                        Some(new) => {
                            let req = client
                                .post(format!("{}/v1/auth/logout", load.target.url(via)))
                                .bearer_auth(&s.access);
                            recorded(&load.rec, Op::Logout, via, req, |r| {
                                (r.status == 401).then(|| s.lost())
                            })
                            .await;
                            session = Some(new);
                        }
                        None => {
                            wait = backoff(&r);
                            session = Some(s);
                        }
                    }
                }
            }
        }
        if !pause(&mut stop, wait).await {
            return session;
        }
    }
}

/// Users validating through the strict-policy replica only.
pub fn strict_validators(load: &Arc<Load>, sessions: Vec<Session>, think_ms: u64) -> Crowd {
    let (stop, rx) = watch::channel(false);
    let tasks = sessions
        .into_iter()
        .map(|s| {
            let load = load.clone();
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let client = client();
                loop {
                    let r = validate(&load, &client, Op::StrictValidate, Via::Strict, &s).await;
                    if r.status == 401 {
                        return None;
                    }
                    if !pause(&mut rx, Duration::from_millis(think_ms)).await {
                        return Some(s);
                    }
                }
            })
        })
        .collect();
    Crowd { stop, tasks }
}

/// Clients that log in as fast as they can, ignoring Retry-After (a retry storm
/// after an outage, a misbehaving batch job). Successful logins' sessions are
/// kept in `issued` to be re-validated afterwards.
pub fn storm(
    load: &Arc<Load>,
    users: &[User],
    clients: usize,
    issued: Arc<Mutex<Vec<Session>>>,
) -> Crowd {
    let (stop, rx) = watch::channel(false);
    let users = Arc::new(users.to_vec());
    let tasks = (0..clients)
        .map(|_| {
            let load = load.clone();
            let users = users.clone();
            let issued = issued.clone();
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let client = client();
                let mut rng = Rng::new();
                loop {
                    let user = &users[rng.between(0, users.len() as u64 - 1) as usize];
                    let r = login(&load, &client, Op::StormLogin, Via::Main, user).await;
                    let pace = match session_from(&r, load.rec.now()) {
                        Some(s) => {
                            if let Ok(mut v) = issued.lock() {
                                v.push(s);
                            }
                            1
                        }
                        // Shed or failed: hammer again almost at once.
                        None => 5,
                    };
                    if !pause(&mut rx, Duration::from_millis(pace)).await {
                        return None;
                    }
                }
            })
        })
        .collect();
    Crowd { stop, tasks }
}

/// Validates each session once (8 at a time); 401s are recorded as lost.
pub async fn recheck(load: &Arc<Load>, sessions: &[Session]) {
    let sessions = Arc::new(sessions.to_vec());
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let load = load.clone();
            let sessions = sessions.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let client = client();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(s) = sessions.get(i) else { return };
                    validate(&load, &client, Op::Recheck, Via::Main, s).await;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
}
