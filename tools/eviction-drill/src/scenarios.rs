//! The scenarios: what each one does to the system, and what it expects.
//!
//! Each scenario runs while the steady load goes on, then judges the requests
//! *started* during it: a table per operation (report.rs) and checks. What counts
//! as failed is decided per scenario by a `classify` function: anything but 2xx,
//! except what the contract promises for the situation (a login answered 503 +
//! Retry-After while PostgreSQL is down, a storm login shed with 503 +
//! Retry-After). The expectations are those of issue 6; docs/resilience.md
//! explains them and how the timings map onto Kubernetes.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;

use crate::{
    haproxy::{is_down, is_up, BACKEND, STRICT_BACKEND},
    load::{self, Event, LostSession, Op, Via},
    report::{self, check, latencies, percentile, warning, Check, Class, Outcome},
    Drill, DEPENDENCY_TIMEOUT_MS, DRAIN_TIMEOUT, SHUTDOWN_DELAY,
};

type Run = for<'a> fn(&'a mut Drill) -> Pin<Box<dyn Future<Output = Result<Outcome>> + 'a>>;

pub struct Scenario {
    pub name: &'static str,
    pub title: &'static str,
    /// Skipped by --quick.
    pub full_only: bool,
    pub run: Run,
}

pub const ALL: &[Scenario] = &[
    Scenario {
        name: "baseline",
        title: "baseline: steady load, nothing happens",
        full_only: false,
        run: |d| Box::pin(baseline(d)),
    },
    Scenario {
        name: "rolling",
        title: "rolling eviction: SIGTERM each replica in turn, replacement after exit",
        full_only: false,
        run: |d| Box::pin(rolling(d)),
    },
    Scenario {
        name: "crash",
        title: "crash: SIGKILL one replica, through the mesh frontend",
        full_only: false,
        run: |d| Box::pin(crash_mesh(d)),
    },
    Scenario {
        name: "crash-nomesh",
        title: "crash without a mesh (for comparison): SIGKILL, main and l4 frontends",
        full_only: true,
        run: |d| Box::pin(crash_main(d)),
    },
    Scenario {
        name: "redis-master",
        title: "Redis master loss: SIGKILL one master under load",
        full_only: false,
        run: |d| Box::pin(redis_master(d)),
    },
    Scenario {
        name: "postgres",
        title: "PostgreSQL outage of 10 s",
        full_only: false,
        run: |d| Box::pin(postgres(d)),
    },
    Scenario {
        name: "redis-down",
        title: "Redis Cluster fully down for 10 s (degraded and strict replicas)",
        full_only: false,
        run: |d| Box::pin(redis_down(d)),
    },
    Scenario {
        name: "storm",
        title: "login storm while every replica is evicted in turn",
        full_only: false,
        run: |d| Box::pin(storm(d)),
    },
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A login shed by the bounded hashing pool (503 + Retry-After, "password hashing
/// is temporarily unavailable"): the contract's answer to more logins than argon2
/// can take, never a failure. The drill shares two cores with everything else on
/// the machine, so this can happen in any scenario; the table counts it under
/// "expected".
fn shed(e: &Event) -> bool {
    matches!(e.op, Op::Login | Op::StormLogin)
        && e.status == 503
        && e.retry_after
        && e.detail
            .as_deref()
            .is_some_and(|d| d.contains("password hashing"))
}

fn strict_success(e: &Event) -> Class {
    if e.is_success() {
        Class::Ok
    } else if shed(e) {
        Class::Expected
    } else {
        Class::Failed
    }
}

fn count(
    events: &[Event],
    classify: &dyn Fn(&Event) -> Class,
    pred: impl Fn(&Event) -> bool,
) -> usize {
    events
        .iter()
        .filter(|e| pred(e) && classify(e) == Class::Failed)
        .count()
}

/// Lost sessions: none may be lost outright; one revoked by reuse detection
/// after a refresh that got no answer is a warning (see report.rs, `lost*`).
fn lost_checks(events: &[Event], lost: impl Fn(&LostSession) -> bool) -> [Check; 2] {
    let clean = events
        .iter()
        .filter(|e| e.lost.is_some_and(|l| lost(&l) && !l.after_failed_refresh))
        .count();
    let unanswered = events
        .iter()
        .filter(|e| e.lost.is_some_and(|l| lost(&l) && l.after_failed_refresh))
        .count();
    [
        check(clean == 0, "0 lost sessions", format!("{clean} lost")),
        warning(
            unanswered == 0,
            "0 sessions revoked after a refresh that got no answer (refresh_reuse_grace_seconds)",
            format!("{unanswered} revoked"),
        ),
    ]
}

/// Waits, then judges the requests started since `start`.
async fn outcome(
    d: &Drill,
    name: &str,
    start: f64,
    classify: &dyn Fn(&Event) -> Class,
) -> (Vec<Event>, Outcome) {
    let end = d.now();
    d.load.rec.settle(end, Duration::from_secs(15)).await;
    let events = d.load.rec.window(start, end);
    let o = Outcome {
        name: name.to_owned(),
        seconds: (end - start) / 1000.0,
        rows: report::rows(&events, classify),
        checks: Vec::new(),
        notes: lost_histories(&events),
        failures: report::failure_kinds(&events, classify),
    };
    (events, o)
}

/// For each lost session (at most three), what its user saw just before: the
/// first thing to read when one is lost.
fn lost_histories(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.lost.is_some() && e.who > 0)
        .take(3)
        .map(|lost| {
            let mut before: Vec<&Event> = events
                .iter()
                .filter(|e| e.who == lost.who && e.start <= lost.start && !e.is_success())
                .collect();
            before.sort_by(|a, b| a.start.total_cmp(&b.start));
            let history: Vec<String> = before
                .iter()
                .rev()
                .take(4)
                .rev()
                .map(|e| {
                    format!(
                        "{} {} at t={:.2}s ({:.0} ms{})",
                        e.op.name(),
                        e.status,
                        e.start / 1000.0,
                        e.ms(),
                        e.detail
                            .as_deref()
                            .map(|d| format!(", {d}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            format!(
                "user {} lost its session (credential acknowledged at t={:.2}s); its last unsuccessful requests: {}",
                lost.who,
                lost.lost.map_or(0.0, |l| l.acked_at) / 1000.0,
                history.join("; ")
            )
        })
        .collect()
}

async fn baseline(d: &mut Drill) -> Result<Outcome> {
    let start = d.now();
    tokio::time::sleep(d.timing.baseline).await;
    let (events, mut o) = outcome(d, "baseline", start, &strict_success).await;
    let failed = count(&events, &strict_success, |_| true);
    o.checks.push(check(
        failed == 0,
        "0 failed requests",
        format!("{failed} failed"),
    ));
    o.checks.extend(lost_checks(&events, |_| true));
    Ok(o)
}

/// What happened to one evicted replica.
struct Eviction {
    name: String,
    /// From SIGTERM until HAProxy's check took it out (ms).
    out_after: f64,
    /// From SIGTERM until the process exited (ms).
    exited_after: f64,
    exit_ok: bool,
    /// From the replacement's start until HAProxy sent it traffic (ms).
    back_after: f64,
}

/// SIGTERM, wait for the exit, start the replacement in the same slot, wait
/// until HAProxy routes to it again.
async fn evict(d: &mut Drill, i: usize) -> Result<Eviction> {
    let name = d.replicas[i].name.clone();
    let t0 = d.now();
    d.replicas[i].signal("TERM").await?;
    d.say(format!("{name}: SIGTERM"));
    d.haproxy
        .wait_status(BACKEND, &name, is_down, Duration::from_secs(5))
        .await?;
    let out = d.now();
    let status = d.replicas[i]
        .wait_exit(SHUTDOWN_DELAY + DRAIN_TIMEOUT + Duration::from_secs(5))
        .await?;
    let exited = d.now();
    d.say(format!(
        "{name}: out of the balancer after {:.2} s, exited ({status}) after {:.2} s",
        (out - t0) / 1000.0,
        (exited - t0) / 1000.0
    ));
    let started = d.now();
    d.replicas[i].start()?;
    d.replicas[i]
        .wait_ready(&d.probe, Duration::from_secs(60))
        .await?;
    d.haproxy
        .wait_status(BACKEND, &name, is_up, Duration::from_secs(10))
        .await?;
    let back = d.now();
    d.say(format!(
        "{name}: replacement in the balancer {:.2} s after its start",
        (back - started) / 1000.0
    ));
    Ok(Eviction {
        name,
        out_after: out - t0,
        exited_after: exited - t0,
        exit_ok: status.success(),
        back_after: back - started,
    })
}

fn eviction_checks(o: &mut Outcome, evictions: &[Eviction]) {
    let bad_exit: Vec<&str> = evictions
        .iter()
        .filter(|e| !e.exit_ok)
        .map(|e| e.name.as_str())
        .collect();
    o.checks.push(check(
        bad_exit.is_empty(),
        "every SIGTERMed replica exited 0",
        if bad_exit.is_empty() {
            format!("{} of {}", evictions.len(), evictions.len())
        } else {
            format!("not: {}", bad_exit.join(", "))
        },
    ));
    let slowest_out = evictions.iter().map(|e| e.out_after).fold(0.0, f64::max);
    o.checks.push(check(
        slowest_out < ms(SHUTDOWN_DELAY),
        "out of the balancer before the listener closes (AUTH_SHUTDOWN_DELAY 3 s)",
        format!("slowest after {:.2} s", slowest_out / 1000.0),
    ));
    for e in evictions {
        o.notes.push(format!(
            "{}: out of the balancer {:.2} s after SIGTERM, exited after {:.2} s, replacement in the balancer {:.2} s after its start",
            e.name,
            e.out_after / 1000.0,
            e.exited_after / 1000.0,
            e.back_after / 1000.0
        ));
    }
}

async fn rolling(d: &mut Drill) -> Result<Outcome> {
    let start = d.now();
    tokio::time::sleep(d.timing.before).await;
    let mut evictions = Vec::new();
    for _ in 0..d.timing.rounds {
        for i in 0..d.replicas.len() {
            evictions.push(evict(d, i).await?);
            tokio::time::sleep(d.timing.between_evictions).await;
        }
    }
    tokio::time::sleep(d.timing.after).await;
    let (events, mut o) = outcome(d, "rolling eviction", start, &strict_success).await;
    let failed = count(&events, &strict_success, |_| true);
    o.checks.push(check(
        failed == 0,
        "0 failed requests",
        format!("{failed} failed"),
    ));
    o.checks.extend(lost_checks(&events, |_| true));
    eviction_checks(&mut o, &evictions);
    Ok(o)
}

/// When a replica was killed: the kill was sent at `begin`, and the process was
/// gone at `done` (ms since the drill began).
struct Kill {
    begin: f64,
    done: f64,
}

impl Kill {
    /// Requests that were running at some moment of the kill, on any replica:
    /// an upper bound for those the dead replica was serving.
    fn in_flight(&self, events: &[Event]) -> usize {
        events
            .iter()
            .filter(|e| e.start <= self.done && e.end >= self.begin)
            .count()
    }
}

/// SIGKILL replica r2 while steady users go through the mesh (or their own
/// frontends); restart it later, as the kubelet would.
async fn crash(d: &mut Drill, mesh: bool, name: &str) -> Result<(Vec<Event>, Outcome, Kill)> {
    d.load.target.use_mesh(mesh);
    // Let every user's keep-alive connection move over to the new frontend.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = d.now();
    tokio::time::sleep(d.timing.before).await;
    let victim = 1;
    let vname = d.replicas[victim].name.clone();
    let (_, scur) = d.haproxy.server(BACKEND, &vname).await?;
    let begin = d.now();
    d.replicas[victim].signal("KILL").await?;
    let _ = d.replicas[victim].wait_exit(Duration::from_secs(5)).await;
    let kill = Kill {
        begin,
        done: d.now(),
    };
    d.say(format!("{vname}: SIGKILL"));
    d.haproxy
        .wait_status(BACKEND, &vname, is_down, Duration::from_secs(5))
        .await?;
    let out = d.now();
    tokio::time::sleep(d.timing.crash_restart_after).await;
    d.replicas[victim].start()?;
    d.replicas[victim]
        .wait_ready(&d.probe, Duration::from_secs(60))
        .await?;
    d.haproxy
        .wait_status(BACKEND, &vname, is_up, Duration::from_secs(10))
        .await?;
    d.say(format!("{vname}: restarted and back in the balancer"));
    tokio::time::sleep(d.timing.after).await;
    d.load.target.use_mesh(false);
    let (events, mut o) = outcome(d, name, start, &strict_success).await;
    o.notes.push(format!(
        "HAProxy took {vname} out {:.2} s after the kill; {} requests were in flight at the kill ({scur} HTTP streams on {vname} just before it)",
        (out - kill.done) / 1000.0,
        kill.in_flight(&events)
    ));
    Ok((events, o, kill))
}

async fn crash_mesh(d: &mut Drill) -> Result<Outcome> {
    let (events, mut o, kill) = crash(d, true, "crash (mesh frontend)").await?;
    let failed = count(&events, &strict_success, |_| true);
    let in_flight = kill.in_flight(&events);
    let after = count(&events, &strict_success, |e| e.start > kill.done);
    o.checks.push(check(
        failed <= in_flight,
        "failures at most the requests in flight at the kill",
        format!("{failed} failed, {in_flight} in flight"),
    ));
    o.checks.push(check(
        after == 0,
        "0 failures among requests sent after the kill (the mesh retries refused connections)",
        format!("{after} failed"),
    ));
    o.checks.extend(lost_checks(&events, |_| true));
    Ok(o)
}

async fn crash_main(d: &mut Drill) -> Result<Outcome> {
    let (events, mut o, _) = crash(d, false, "crash without a mesh (comparison)").await?;
    o.notes.push(
        "no expectation on failures here: without retries, requests routed to the dead replica before the check notices fail; this is what the mesh scenario avoids".into(),
    );
    o.checks.extend(lost_checks(&events, |_| true));
    Ok(o)
}

async fn redis_master(d: &mut Drill) -> Result<Outcome> {
    let start = d.now();
    tokio::time::sleep(d.timing.before).await;
    let (master, replica) = d.redis.a_master_and_its_replica().await?;
    let killed_at = d.now();
    d.redis.kill(&[master]).await?;
    d.say(format!(
        "Redis master :{master} SIGKILLed; waiting for its replica :{replica}"
    ));
    d.redis
        .wait_master(replica, Duration::from_secs(30))
        .await?;
    let promoted_at = d.now();
    d.say(format!(
        "Redis :{replica} promoted {:.1} s after the kill",
        (promoted_at - killed_at) / 1000.0
    ));
    tokio::time::sleep(d.timing.after_promotion).await;
    d.redis.restart(master).await?;
    d.redis.wait_healthy(Duration::from_secs(60)).await?;
    d.say(format!(
        "Redis :{master} back as a replica; cluster healthy"
    ));
    tokio::time::sleep(d.timing.after).await;
    let (events, mut o) = outcome(d, "Redis master loss", start, &strict_success).await;

    // "Within a few seconds of the promotion": the client must learn the new
    // topology (MOVED / slot refresh); we allow 3 s.
    let recovery_ms = 3000.0;
    let late = count(&events, &strict_success, |e| {
        e.start > promoted_at + recovery_ms
    });
    let last_failure = events
        .iter()
        .filter(|e| strict_success(e) == Class::Failed)
        .map(|e| e.start)
        .fold(f64::NAN, f64::max);
    // Sessions whose credential was acknowledged before the kill: the ones the
    // replica had to have (WAIT 1 on every session write).
    let mut lost = lost_checks(&events, |l| l.acked_at < killed_at);
    lost[0].what = "0 lost sessions acknowledged before the kill".into();
    o.checks.extend(lost);
    o.checks.push(check(
        late == 0,
        "0 failures from 3 s after the promotion on",
        format!("{late} failed"),
    ));
    o.notes.push(format!(
        "failover: replica promoted {:.1} s after the kill (cluster-node-timeout 5 s); {}",
        (promoted_at - killed_at) / 1000.0,
        if last_failure.is_nan() {
            "no request failed".to_owned()
        } else {
            format!(
                "last failed request started {:+.1} s from the promotion",
                (last_failure - promoted_at) / 1000.0
            )
        }
    ));
    let after_kill = events
        .iter()
        .filter(|e| e.lost.is_some_and(|l| l.acked_at >= killed_at))
        .count();
    if after_kill > 0 {
        o.notes.push(format!(
            "{after_kill} sessions acknowledged after the kill were lost or revoked"
        ));
    }
    Ok(o)
}

async fn postgres(d: &mut Drill) -> Result<Outcome> {
    let start = d.now();
    tokio::time::sleep(d.timing.before).await;
    let down_at = d.now();
    d.pg.stop().await?;
    // `pg_ctl stop` returns once the server is gone; a login that started before
    // that (on a loaded machine, hundreds of ms after `down_at`) may still succeed.
    // Likewise one still waiting for a connection when PostgreSQL comes back: so
    // the check below takes the logins that ran wholly inside the outage.
    let stopped_at = d.now();
    d.say("PostgreSQL stopped (-m immediate)");
    tokio::time::sleep(d.timing.outage).await;
    let restart_at = d.now();
    d.pg.start().await?;
    let up_at = d.now();
    d.say(format!(
        "PostgreSQL back after {:.1} s",
        (up_at - down_at) / 1000.0
    ));
    tokio::time::sleep(d.timing.after + Duration::from_secs(5)).await;
    let back_within = 5000.0;
    let classify = move |e: &Event| {
        if e.is_success() {
            Class::Ok
        } else if shed(e)
            || (e.op == Op::Login
                && e.status == 503
                && e.retry_after
                && e.end >= down_at
                && e.start <= up_at + back_within)
        {
            Class::Expected
        } else {
            Class::Failed
        }
    };
    let (events, mut o) = outcome(d, "PostgreSQL outage", start, &classify).await;
    let failed_vr = count(&events, &classify, |e| {
        matches!(e.op, Op::Validate | Op::ForwardAuth | Op::Refresh)
    });
    o.checks.push(check(
        failed_vr == 0,
        "0 failed validations and refreshes",
        format!("{failed_vr} failed"),
    ));
    let outage_logins: Vec<&Event> = events
        .iter()
        .filter(|e| e.op == Op::Login && e.start >= stopped_at && e.end < restart_at)
        .collect();
    let not_503 = outage_logins
        .iter()
        .filter(|e| !(e.status == 503 && e.retry_after))
        .count();
    let slowest = outage_logins.iter().map(|e| e.ms()).fold(0.0, f64::max);
    o.checks.push(check(
        !outage_logins.is_empty() && not_503 == 0 && slowest < 1000.0,
        "logins during the outage: 503 + Retry-After, in under a second",
        format!(
            "{} logins, {not_503} otherwise answered, slowest {slowest:.0} ms",
            outage_logins.len()
        ),
    ));
    let late = count(&events, &classify, |e| {
        e.op == Op::Login && e.start > up_at + back_within
    });
    let first_ok = events
        .iter()
        .filter(|e| e.op == Op::Login && e.is_success() && e.start > up_at)
        .map(|e| e.start)
        .fold(f64::INFINITY, f64::min);
    o.checks.push(check(
        late == 0 && first_ok.is_finite() && first_ok < up_at + back_within,
        "logins back within 5 s of PostgreSQL's return",
        if first_ok.is_finite() {
            format!(
                "first successful login {:.1} s after the return; {late} failed after 5 s",
                (first_ok - up_at) / 1000.0
            )
        } else {
            "no successful login after the return".into()
        },
    ));
    let other = count(&events, &classify, |e| {
        !matches!(
            e.op,
            Op::Validate | Op::ForwardAuth | Op::Refresh | Op::Login
        )
    });
    o.checks.push(check(
        other == 0,
        "0 failed logouts",
        format!("{other} failed"),
    ));
    o.checks.extend(lost_checks(&events, |_| true));
    Ok(o)
}

async fn redis_down(d: &mut Drill) -> Result<Outcome> {
    // The strict replica, and a few users validating through it only.
    d.strict.start()?;
    d.strict
        .wait_ready(&d.probe, Duration::from_secs(60))
        .await?;
    d.haproxy
        .wait_status(STRICT_BACKEND, "s1", is_up, Duration::from_secs(10))
        .await?;
    let client = load::client();
    let mut sessions = Vec::new();
    for u in &d.strict_users {
        let r = load::login(&d.load, &client, Op::Login, Via::Main, u).await;
        let s = r.body.as_ref().and_then(|b| {
            Some(load::Session {
                access: b.get("access_token")?.as_str()?.to_owned(),
                refresh: b.get("refresh_token")?.as_str()?.to_owned(),
                acked_at: d.load.rec.now(),
                uncertain: false,
            })
        });
        sessions.extend(s);
    }
    let strict_crowd = load::strict_validators(&d.load, sessions, 50);
    d.say("strict replica s1 up, 4 users validating through it");

    let start = d.now();
    tokio::time::sleep(d.timing.before).await;
    let ports = d.redis.ports.clone();
    let down_at = d.now();
    d.redis.kill(&ports).await?;
    d.say("Redis Cluster: all 6 nodes SIGKILLed");
    tokio::time::sleep(d.timing.outage).await;
    let back_at = d.now();
    for &p in &ports {
        d.redis.restart(p).await?;
    }
    d.redis.wait_healthy(Duration::from_secs(60)).await?;
    let healthy_at = d.now();
    d.say(format!(
        "Redis Cluster: restarted from its append-only files, healthy {:.1} s after the restart began",
        (healthy_at - back_at) / 1000.0
    ));
    tokio::time::sleep(d.timing.after + Duration::from_secs(5)).await;
    let recover = 5000.0;
    let classify = move |e: &Event| {
        if e.is_success() {
            Class::Ok
        } else if shed(e)
            || (matches!(
                e.op,
                Op::Login | Op::Refresh | Op::Logout | Op::StrictValidate
            ) && e.status == 503
                && e.retry_after
                && e.end >= down_at
                && e.start < healthy_at + recover)
        {
            Class::Expected
        } else {
            Class::Failed
        }
    };
    let (events, mut o) = outcome(d, "Redis Cluster down", start, &classify).await;
    let _ = strict_crowd.stop().await;
    d.strict.signal("TERM").await?;
    let _ = d
        .strict
        .wait_exit(SHUTDOWN_DELAY + DRAIN_TIMEOUT + Duration::from_secs(5))
        .await;

    let degraded_failed = count(&events, &classify, |e| {
        matches!(e.op, Op::Validate | Op::ForwardAuth)
    });
    o.checks.push(check(
        degraded_failed == 0,
        "degraded policy: 0 failed validations of valid tokens",
        format!("{degraded_failed} failed"),
    ));
    let strict_window: Vec<&Event> = events
        .iter()
        .filter(|e| {
            e.op == Op::StrictValidate
                && e.start > down_at + 100.0
                && e.start < back_at - DEPENDENCY_TIMEOUT_MS
        })
        .collect();
    let strict_other = strict_window
        .iter()
        .filter(|e| !(e.status == 503 && e.retry_after))
        .count();
    o.checks.push(check(
        !strict_window.is_empty() && strict_other == 0,
        "strict policy: validations during the outage answered 503 + Retry-After and nothing else",
        format!(
            "{} validations, {strict_other} answered otherwise",
            strict_window.len()
        ),
    ));
    let late = count(&events, &classify, |e| e.start >= healthy_at + recover);
    o.checks.push(check(
        late == 0,
        "0 failures from 5 s after the cluster is healthy again",
        format!("{late} failed"),
    ));
    let other = count(&events, &classify, |e| e.start < healthy_at + recover);
    o.checks.push(check(
        other == 0,
        "during the outage only the contract's 503 + Retry-After",
        format!("{other} other failures"),
    ));
    o.checks.extend(lost_checks(&events, |_| true));
    let during = latencies(events.iter().filter(|e| {
        matches!(e.op, Op::Validate | Op::ForwardAuth) && e.start > down_at && e.start < back_at
    }));
    o.notes.push(format!(
        "degraded validations during the outage: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&during, 50.0),
        percentile(&during, 99.0),
        during.last().copied().unwrap_or(0.0)
    ));
    Ok(o)
}

async fn storm(d: &mut Drill) -> Result<Outcome> {
    let issued = Arc::new(Mutex::new(Vec::new()));
    let start = d.now();
    let crowd = load::storm(&d.load, &d.storm_users, d.storm_clients, issued.clone());
    d.say(format!("login storm: {} clients", d.storm_clients));
    tokio::time::sleep(d.timing.before + Duration::from_secs(1)).await;
    let mut evictions = Vec::new();
    for i in 0..d.replicas.len() {
        evictions.push(evict(d, i).await?);
        tokio::time::sleep(d.timing.between_evictions).await;
    }
    tokio::time::sleep(d.timing.after).await;
    let _ = crowd.stop().await;
    let storm_end = d.now();
    let issued: Vec<load::Session> = issued.lock().map(|v| v.clone()).unwrap_or_default();
    d.say(format!(
        "storm over; re-validating the {} sessions it created",
        issued.len()
    ));
    load::recheck(&d.load, &issued).await;
    let classify = |e: &Event| {
        if e.is_success() {
            Class::Ok
        } else if matches!(e.op, Op::Login | Op::StormLogin) && e.status == 503 && e.retry_after {
            Class::Expected
        } else {
            Class::Failed
        }
    };
    let (events, mut o) = outcome(
        d,
        "login storm + eviction of every replica",
        start,
        &classify,
    )
    .await;
    let failed = count(&events, &classify, |_| true);
    o.checks.push(check(
        failed == 0,
        "0 failed requests (logins: 200, or 503 + Retry-After when shed)",
        format!("{failed} failed"),
    ));
    o.checks.extend(lost_checks(&events, |_| true));
    let validations = latencies(
        events
            .iter()
            .filter(|e| matches!(e.op, Op::Validate | Op::ForwardAuth)),
    );
    let p99 = percentile(&validations, 99.0);
    o.checks.push(check(
        p99 < d.storm_validate_p99_ms,
        format!(
            "validate latency bounded: p99 under {:.0} ms",
            d.storm_validate_p99_ms
        ),
        format!("p99 {p99:.1} ms"),
    ));
    let storm_events: Vec<&Event> = events.iter().filter(|e| e.op == Op::StormLogin).collect();
    let shed = storm_events.iter().filter(|e| e.status == 503).count();
    let ok = storm_events.iter().filter(|e| e.is_success()).count();
    let seconds = (storm_end - start) / 1000.0;
    o.checks.push(check(
        shed > 0,
        "the storm exceeded the hashing capacity (some logins shed)",
        format!(
            "{:.0} logins/s attempted, {:.0}/s succeeded, {shed} shed",
            storm_events.len() as f64 / seconds,
            ok as f64 / seconds
        ),
    ));
    eviction_checks(&mut o, &evictions);
    Ok(o)
}

/// After the last scenario: stop the steady users and validate every session
/// they hold; then one table for the whole drill's end.
pub async fn final_recheck(d: &mut Drill) -> Result<Outcome> {
    let start = d.now();
    let sessions = match d.steady.take() {
        Some(crowd) => crowd.stop().await,
        None => Vec::new(),
    };
    load::recheck(&d.load, &sessions).await;
    let (events, mut o) = outcome(
        d,
        "end: every steady user's session",
        start,
        &strict_success,
    )
    .await;
    let rechecked = events.iter().filter(|e| e.op == Op::Recheck).count();
    o.checks.push(check(
        rechecked == sessions.len() && count(&events, &strict_success, |_| true) == 0,
        "every session held at the end still validates",
        format!("{rechecked} sessions re-validated"),
    ));
    o.checks.extend(lost_checks(&events, |_| true));
    Ok(o)
}
