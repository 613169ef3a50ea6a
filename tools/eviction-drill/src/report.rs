//! Turning a scenario's requests into its table and its pass/fail checks.

use std::collections::BTreeMap;

use crate::load::{Event, Op};

/// How a scenario judges one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx.
    Ok,
    /// Not 2xx, but what the contract promises in this situation (e.g. a login
    /// answered 503 + Retry-After while PostgreSQL is down).
    Expected,
    Failed,
}

/// One line of a scenario's table.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub sent: usize,
    pub ok: usize,
    pub expected: usize,
    pub failed: usize,
    /// Sessions refused although nothing cast doubt on their credential.
    pub lost: usize,
    /// Sessions revoked by reuse detection after a refresh with their token got
    /// no definitive answer (see load.rs and docs/resilience.md).
    pub revoked_after_unanswered: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// One expectation and whether it held.
#[derive(Debug, Clone)]
pub struct Check {
    pub ok: bool,
    /// A miss is reported as WARN and does not fail the drill: used only where
    /// the expectation depends on configuration the drill leaves at the service's
    /// default, and docs/resilience.md says which (refresh reuse grace).
    pub warn_only: bool,
    pub what: String,
    pub got: String,
}

pub fn check(ok: bool, what: impl Into<String>, got: impl Into<String>) -> Check {
    Check {
        ok,
        warn_only: false,
        what: what.into(),
        got: got.into(),
    }
}

pub fn warning(ok: bool, what: impl Into<String>, got: impl Into<String>) -> Check {
    Check {
        warn_only: true,
        ..check(ok, what, got)
    }
}

/// A scenario's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: String,
    pub seconds: f64,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    pub failures: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok || c.warn_only)
    }

    pub fn warnings(&self) -> usize {
        self.checks.iter().filter(|c| !c.ok && c.warn_only).count()
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latencies (ms) of `events`, sorted.
pub fn latencies<'a>(events: impl Iterator<Item = &'a Event>) -> Vec<f64> {
    let mut v: Vec<f64> = events.map(Event::ms).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn row(label: String, events: &[&Event], classify: &dyn Fn(&Event) -> Class) -> Row {
    let lat = latencies(events.iter().copied());
    let mut r = Row {
        label,
        sent: events.len(),
        ok: 0,
        expected: 0,
        failed: 0,
        lost: events
            .iter()
            .filter(|e| e.lost.is_some_and(|l| !l.after_failed_refresh))
            .count(),
        revoked_after_unanswered: events
            .iter()
            .filter(|e| e.lost.is_some_and(|l| l.after_failed_refresh))
            .count(),
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        max: lat.last().copied().unwrap_or(0.0),
    };
    for e in events {
        match classify(e) {
            Class::Ok => r.ok += 1,
            Class::Expected => r.expected += 1,
            Class::Failed => r.failed += 1,
        }
    }
    r
}

/// One row per operation, then the total.
pub fn rows(events: &[Event], classify: &dyn Fn(&Event) -> Class) -> Vec<Row> {
    let mut by_op: BTreeMap<Op, Vec<&Event>> = BTreeMap::new();
    for e in events {
        by_op.entry(e.op).or_default().push(e);
    }
    let mut out: Vec<Row> = by_op
        .into_iter()
        .map(|(op, evs)| row(op.name().to_owned(), &evs, classify))
        .collect();
    let all: Vec<&Event> = events.iter().collect();
    out.push(row("all".into(), &all, classify));
    out
}

/// The most frequent kinds of failed requests, for the log: what, where, how many.
pub fn failure_kinds(events: &[Event], classify: &dyn Fn(&Event) -> Class) -> Vec<String> {
    let mut kinds: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for e in events.iter().filter(|e| classify(e) == Class::Failed) {
        let key = format!(
            "{} via {:?} -> {} {} (server {})",
            e.op.name(),
            e.via,
            if e.status == 0 {
                "no answer".to_owned()
            } else {
                e.status.to_string()
            },
            e.detail.as_deref().unwrap_or(""),
            e.server.as_deref().unwrap_or("?"),
        );
        let k = kinds.entry(key).or_insert((0, e.start));
        k.0 += 1;
    }
    let mut v: Vec<_> = kinds.into_iter().collect();
    v.sort_by_key(|k| std::cmp::Reverse(k.1 .0));
    v.into_iter()
        .take(8)
        .map(|(k, (n, first))| format!("{n} x {k}, first at t={:.1}s", first / 1000.0))
        .collect()
}

pub fn print(o: &Outcome) {
    println!();
    println!("== {} ({:.0} s) ==", o.name, o.seconds);
    println!(
        "| {:<18} | {:>6} | {:>6} | {:>8} | {:>6} | {:>4} | {:>5} | {:>7} | {:>7} | {:>7} |",
        "requests",
        "sent",
        "ok",
        "expected",
        "failed",
        "lost",
        "lost*",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    println!(
        "|{:-<20}|{:->8}|{:->8}|{:->10}|{:->8}|{:->6}|{:->7}|{:->9}|{:->9}|{:->9}|",
        "", ":", ":", ":", ":", ":", ":", ":", ":", ":"
    );
    for r in &o.rows {
        println!(
            "| {:<18} | {:>6} | {:>6} | {:>8} | {:>6} | {:>4} | {:>5} | {:>7.1} | {:>7.1} | {:>7.1} |",
            r.label,
            r.sent,
            r.ok,
            r.expected,
            r.failed,
            r.lost,
            r.revoked_after_unanswered,
            r.p50,
            r.p99,
            r.max
        );
    }
    for n in &o.notes {
        println!("  note: {n}");
    }
    for f in &o.failures {
        println!("  failed: {f}");
    }
    for c in &o.checks {
        println!(
            "  {} {} -- {}",
            match (c.ok, c.warn_only) {
                (true, _) => "PASS",
                (false, true) => "WARN",
                (false, false) => "FAIL",
            },
            c.what,
            c.got
        );
    }
}

pub fn print_summary(outcomes: &[Outcome]) {
    println!();
    println!("== summary ==");
    println!(
        "| {:<40} | {:>6} | {:>6} | {:>4} | {:>5} | {:>13} | {:<6} |",
        "scenario", "sent", "failed", "lost", "lost*", "validate p99", "result"
    );
    println!(
        "|{:-<42}|{:->8}|{:->8}|{:->6}|{:->7}|{:->15}|{:-<8}|",
        "", ":", ":", ":", ":", ":", ""
    );
    for o in outcomes {
        let all = o.rows.last();
        let validate_p99 = o
            .rows
            .iter()
            .find(|r| r.label == "validate")
            .map_or(0.0, |r| r.p99);
        println!(
            "| {:<40} | {:>6} | {:>6} | {:>4} | {:>5} | {:>10.1} ms | {:<6} |",
            o.name,
            all.map_or(0, |r| r.sent),
            all.map_or(0, |r| r.failed),
            all.map_or(0, |r| r.lost),
            all.map_or(0, |r| r.revoked_after_unanswered),
            validate_p99,
            match (o.passed(), o.warnings()) {
                (false, _) => "FAIL",
                (true, 0) => "pass",
                (true, _) => "WARN",
            }
        );
    }
    println!();
    println!("lost: a session refused although its credential came from a successful answer");
    println!("lost*: a session revoked by refresh-token reuse detection after a refresh with");
    println!("       its token got no definitive answer (sent when a replica or a Redis");
    println!("       master died); see docs/resilience.md, \"Refresh in flight\"");
}
