//! What the daemon knows about its own progress, and how it is shown.
//!
//! The queue itself lives in the journal; the worker's threads publish here
//! the counters since start and, per target, the paths backing off. One
//! table of fields renders `status` for people, `status json` and the
//! Prometheus metrics.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::journal::{GivenUp, Journal, TargetId};
use crate::protocol::one_line;
use crate::redact;
use crate::store_path::StorePath;
use crate::target::Target;

/// Dropped paths remembered for `wait` (older ones are forgotten).
const RECENT_DROPS: usize = 10_000;
/// The upload rate is measured over this much of the recent past.
pub const RATE_WINDOW: Duration = Duration::from_secs(300);
/// Most paths listed per kind (backing off, in flight, given up on).
const LISTED: usize = 100;
/// Paths of the calls in progress the text names.
const TEXT_IN_FLIGHT: usize = 5;

/// A path backing off on a target, as published by its lane.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Failed attempts so far (since the daemon started).
    pub attempts: u32,
    /// When it is tried again; `None` while it is being retried.
    pub next_try: Option<Instant>,
    /// What went wrong the last time.
    pub last_error: String,
}

/// One target's counters and failures since the daemon started.
#[derive(Debug)]
pub struct TargetStats {
    /// The journal's name for the target.
    pub id: TargetId,
    /// How it is shown (secrets masked).
    pub label: String,
    /// Paths backing off after a failure on this target.
    pub backoff: HashMap<StorePath, Backoff>,
    /// The paths of its call in progress.
    pub in_flight: Vec<StorePath>,
    /// Paths this target took since start.
    pub delivered: u64,
    /// Paths given up on for this target since start.
    pub given_up: u64,
    /// Failed calls to this target since start.
    pub failed_calls: u64,
    /// The error of its last call, if that call failed.
    pub last_error: Option<String>,
}

/// Counters and failure state since the daemon started.
#[derive(Debug)]
pub struct Stats {
    /// When the daemon started.
    pub started: Instant,
    /// Paths that every target has (or that were only signed).
    pub uploaded: u64,
    /// Paths dropped (gone from the store, or by an operator).
    pub dropped: u64,
    /// Paths given up on for a target, over all targets.
    pub given_up: u64,
    /// nix calls that failed.
    pub failed_calls: u64,
    /// The batch being prepared (derivations resolved, signed).
    pub in_flight_paths: Vec<StorePath>,
    /// Paths finished in the last [`RATE_WINDOW`], with when, oldest first.
    pub recent_uploads: VecDeque<(Instant, u64)>,
    /// Seconds spent in successful upload calls.
    pub upload_seconds: f64,
    /// Number of successful upload calls.
    pub upload_batches: u64,
    /// Each target's state, in the order of the configuration.
    pub targets: Vec<TargetStats>,
    /// Sequence numbers of recently dropped paths, oldest first.
    pub recent_drops: VecDeque<u64>,
}

impl Stats {
    /// Removes a path's failures on every target (it is done or dropped).
    pub fn forget(&mut self, path: &StorePath) {
        for t in &mut self.targets {
            t.backoff.remove(path);
        }
    }

    /// Paths backing off on some target, each counted once.
    pub fn backing_off(&self) -> usize {
        match self.targets.as_slice() {
            [one] => one.backoff.len(),
            all => all
                .iter()
                .flat_map(|t| t.backoff.keys())
                .collect::<HashSet<_>>()
                .len(),
        }
    }

    /// Records that `n` paths were uploaded now.
    pub fn record_uploads(&mut self, n: u64) {
        let now = Instant::now();
        self.recent_uploads.push_back((now, n));
        while self
            .recent_uploads
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.recent_uploads.pop_front();
        }
    }

    /// Records that a path with this sequence number was dropped.
    pub fn record_drop(&mut self, seq: Option<u64>) {
        self.dropped += 1;
        if let Some(seq) = seq {
            self.recent_drops.push_back(seq);
            if self.recent_drops.len() > RECENT_DROPS {
                self.recent_drops.pop_front();
            }
        }
    }
}

/// What the daemon's threads share besides the journal.
pub struct Shared {
    stats: Mutex<Stats>,
    /// Set when the daemon is stopping: no new connections, no new batches.
    pub stopping: AtomicBool,
    /// Process groups of the nix calls running now (0: none), one per
    /// worker thread, killed when a stop outlasts its grace period.
    running: Vec<Arc<AtomicU32>>,
}

impl Shared {
    /// Fresh statistics for these targets, starting now.
    pub fn new(targets: &[Target]) -> Shared {
        let target = |t: &Target| TargetStats {
            id: t.id,
            label: t.label.clone(),
            backoff: HashMap::new(),
            in_flight: Vec::new(),
            delivered: 0,
            given_up: 0,
            failed_calls: 0,
            last_error: None,
        };
        Shared {
            stopping: AtomicBool::new(false),
            running: (0..=targets.len()).map(|_| Arc::default()).collect(),
            stats: Mutex::new(Stats {
                started: Instant::now(),
                uploaded: 0,
                dropped: 0,
                given_up: 0,
                failed_calls: 0,
                in_flight_paths: Vec::new(),
                recent_uploads: VecDeque::new(),
                upload_seconds: 0.0,
                upload_batches: 0,
                targets: targets.iter().map(target).collect(),
                recent_drops: VecDeque::new(),
            }),
        }
    }

    /// Locks the statistics; a poisoned lock still holds usable counters.
    pub fn lock(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the worker's threads publish their calls' process groups: the
    /// front's first, then one per target.
    pub fn running(&self) -> Vec<Arc<AtomicU32>> {
        self.running.clone()
    }

    /// The process groups of the nix calls running now.
    pub fn running_pgids(&self) -> Vec<u32> {
        let pgids = self.running.iter().map(|r| r.load(Ordering::SeqCst));
        pgids.filter(|&p| p != 0).collect()
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new(&[Target::sign_only()])
    }
}

/// One consistent look at the queue, for `status` and the metrics file.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Seconds since the daemon started.
    pub uptime_seconds: u64,
    /// Paths in the journal.
    pub queued: usize,
    /// The paths of the calls in progress (and the batch being prepared).
    pub in_flight_paths: Vec<StorePath>,
    /// Request files in the spool not ingested yet.
    pub spool_files: usize,
    /// Paths in those files.
    pub spool_paths: usize,
    /// Paths uploaded per minute lately (see [`RATE_WINDOW`]).
    pub upload_rate_per_minute: f64,
    /// Paths finished since start.
    pub uploaded: u64,
    /// Paths dropped since start.
    pub dropped: u64,
    /// Failed nix calls since start.
    pub failed_calls: u64,
    /// Age of the oldest queued path, if any.
    pub oldest_queued_seconds: Option<u64>,
    /// Total seconds of successful upload calls.
    pub upload_seconds: f64,
    /// Number of successful upload calls.
    pub upload_batches: u64,
    /// Whether a signing key is configured.
    pub signing: bool,
    /// The upload targets with secrets masked, `, `-separated.
    pub target: Option<String>,
    /// Paths backing off on some target (each counted once).
    pub backing_off: usize,
    /// Backing-off paths, soonest first: (attempts, seconds to next try,
    /// path, last error), one per path and target; with several targets
    /// the error starts with the target's label.
    pub backoff: Vec<(u32, f64, StorePath, String)>,
    /// Paths given up on after failures since start (a counter).
    pub given_up_total: u64,
    /// Paths given up on for a target now, oldest first, with how long ago.
    pub failed: Vec<(StorePath, GivenUp, u64)>,
    /// Each target's state.
    pub targets: Vec<TargetSnapshot>,
}

/// One target's state, for `status` and the metrics.
#[derive(Debug, Clone)]
pub struct TargetSnapshot {
    /// The journal's name for it.
    pub id: TargetId,
    /// How it is shown (secrets masked).
    pub label: String,
    /// Queued paths it does not have yet (given up on ones aside).
    pub queued: usize,
    /// Paths it took since start.
    pub delivered: u64,
    /// Paths backing off on it.
    pub backing_off: usize,
    /// Paths given up on for it now.
    pub failed: usize,
    /// Paths given up on for it since start.
    pub given_up_total: u64,
    /// Failed calls to it since start.
    pub failed_calls: u64,
    /// The error of its last call, if that call failed.
    pub last_error: Option<String>,
}

/// A field's value: a number with its decimals (`None`: unknown), text, or
/// a flag.
enum Value {
    Num(Option<f64>, usize),
    Text(Option<String>),
    Flag(bool),
}

fn int(n: impl Into<u64>) -> Value {
    Value::Num(Some(n.into() as f64), 0)
}

/// A field: its `status json` key (empty: a metric only), its metric's
/// name, type and help (empty name: no metric), and its value.
type Field = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    fn(&Snapshot) -> Value,
);

/// The fields, in the order `status json` shows them.
const FIELDS: &[Field] = &[
    ("version", "", "", "", |_| {
        Value::Text(Some(crate::VERSION.into()))
    }),
    ("uptime_seconds", "", "", "", |s| int(s.uptime_seconds)),
    (
        "queued",
        "queued",
        "gauge",
        "Paths journaled and not yet uploaded.",
        |s| int(s.queued as u64),
    ),
    (
        "in_flight",
        "in_flight",
        "gauge",
        "Paths in the calls in progress.",
        |s| int(s.in_flight_paths.len() as u64),
    ),
    (
        "uploaded",
        "uploaded_total",
        "counter",
        "Paths signed and uploaded to every target since the daemon started.",
        |s| int(s.uploaded),
    ),
    (
        "dropped",
        "dropped_total",
        "counter",
        "Paths given up on since the daemon started.",
        |s| int(s.dropped),
    ),
    (
        "failed_calls",
        "failed_calls_total",
        "counter",
        "Failed nix calls since the daemon started.",
        |s| int(s.failed_calls),
    ),
    (
        "backing_off",
        "backing_off",
        "gauge",
        "Paths waiting to be retried after a failure.",
        |s| int(s.backing_off as u64),
    ),
    (
        "failed",
        "failed",
        "gauge",
        "Paths given up on after repeated failures, kept until requeued or dropped.",
        |s| int(s.failed.len() as u64),
    ),
    (
        "oldest_queued_seconds",
        "oldest_queued_age_seconds",
        "gauge",
        "Age of the oldest queued path (0 when the queue is empty).",
        |s| Value::Num(s.oldest_queued_seconds.map(|n| n as f64), 0),
    ),
    ("upload_seconds_sum", "", "", "", |s| {
        Value::Num(Some(s.upload_seconds), 3)
    }),
    ("upload_batches", "", "", "", |s| int(s.upload_batches)),
    ("upload_rate_per_minute", "", "", "", |s| {
        Value::Num(Some(s.upload_rate_per_minute), 1)
    }),
    (
        "spool_files",
        "spool_files",
        "gauge",
        "Request files the hook left in the spool, not yet queued.",
        |s| int(s.spool_files as u64),
    ),
    (
        "spool_paths",
        "spool_paths",
        "gauge",
        "Paths in those spool files.",
        |s| int(s.spool_paths as u64),
    ),
    ("signing", "", "", "", |s| Value::Flag(s.signing)),
    ("target", "", "", "", |s| Value::Text(s.target.clone())),
    (
        "",
        "given_up_total",
        "counter",
        "Paths given up on after repeated failures since the daemon started.",
        |s| int(s.given_up_total),
    ),
];

/// A per-target metric: name, type, help, and its value for a target.
type PerTarget = (
    &'static str,
    &'static str,
    &'static str,
    fn(&TargetSnapshot) -> u64,
);

const PER_TARGET: &[PerTarget] = &[
    (
        "target_queued",
        "gauge",
        "Queued paths this target does not have yet (those given up on aside).",
        |t| t.queued as u64,
    ),
    (
        "target_delivered_total",
        "counter",
        "Paths this target took since the daemon started.",
        |t| t.delivered,
    ),
    (
        "target_backing_off",
        "gauge",
        "Paths waiting to be retried on this target after a failure.",
        |t| t.backing_off as u64,
    ),
    (
        "target_failed",
        "gauge",
        "Paths given up on for this target, kept until requeued or dropped.",
        |t| t.failed as u64,
    ),
    (
        "target_given_up_total",
        "counter",
        "Paths given up on for this target since the daemon started.",
        |t| t.given_up_total,
    ),
    (
        "target_failed_calls_total",
        "counter",
        "Failed calls to this target since the daemon started.",
        |t| t.failed_calls,
    ),
    (
        "target_up",
        "gauge",
        "1 when the last call to this target went through (or none was made), 0 when it failed.",
        |t| u64::from(t.last_error.is_none()),
    ),
];

impl Snapshot {
    /// Takes a snapshot of the journal and the statistics, secrets masked.
    pub fn take(journal: &Journal, shared: &Shared, spool_dir: &Path, signing: bool) -> Snapshot {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let oldest_queued_seconds = journal.oldest().map(|e| now.saturating_sub(e.queued_at));
        let ids: Vec<(TargetId, String)> = shared
            .lock()
            .targets
            .iter()
            .map(|t| (t.id, t.label.clone()))
            .collect();
        // Errors quote nix, which may repeat a target with its password.
        let tagged = |label: &str, error: &str| match ids.len() {
            1 => redact::text(error),
            _ => redact::text(&format!("{label}: {error}")),
        };
        let (mut failed, mut pending) = (Vec::new(), Vec::new());
        for (id, label) in &ids {
            let given_up = journal.given_up_on(*id);
            pending.push((journal.count_pending(*id), given_up.len()));
            for (p, mut g) in given_up {
                g.error = tagged(label, &g.error);
                failed.push((p, g.clone(), now.saturating_sub(g.at)));
            }
        }
        let (spool_files, spool_paths) = crate::spool::backlog(spool_dir);
        let stats = shared.lock();
        let mut backoff = Vec::new();
        let mut in_flight = stats.in_flight_paths.clone();
        for t in &stats.targets {
            backoff.extend(t.backoff.iter().map(|(p, b)| {
                let next = b.next_try.map_or(0.0, |t| {
                    t.saturating_duration_since(Instant::now()).as_secs_f64()
                });
                (b.attempts, next, p.clone(), tagged(&t.label, &b.last_error))
            }));
            in_flight.extend(t.in_flight.iter().cloned());
        }
        let mut seen = HashSet::new();
        in_flight.retain(|p| seen.insert(p.clone()));
        backoff.sort_by(|a, b| a.1.total_cmp(&b.1));
        let targets = stats
            .targets
            .iter()
            .zip(pending)
            .map(|(t, (queued, given_up))| TargetSnapshot {
                id: t.id,
                label: t.label.clone(),
                queued,
                delivered: t.delivered,
                backing_off: t.backoff.len(),
                failed: given_up,
                given_up_total: t.given_up,
                failed_calls: t.failed_calls,
                last_error: t.last_error.as_deref().map(redact::text),
            });
        let labels: Vec<&str> = ids
            .iter()
            .map(|(_, l)| l.as_str())
            .filter(|l| *l != "-")
            .collect();
        Snapshot {
            uptime_seconds: stats.started.elapsed().as_secs(),
            queued: journal.len(),
            in_flight_paths: in_flight,
            spool_files,
            spool_paths,
            upload_rate_per_minute: upload_rate_per_minute(&stats),
            uploaded: stats.uploaded,
            dropped: stats.dropped,
            failed_calls: stats.failed_calls,
            oldest_queued_seconds,
            upload_seconds: stats.upload_seconds,
            upload_batches: stats.upload_batches,
            signing,
            target: (!labels.is_empty()).then(|| labels.join(", ")),
            backing_off: stats.backing_off(),
            backoff,
            given_up_total: stats.given_up,
            failed,
            targets: targets.collect(),
        }
    }

    /// The targets shown (not the "sign only" one).
    fn shown(&self) -> impl Iterator<Item = &TargetSnapshot> {
        self.targets.iter().filter(|t| t.label != "-")
    }

    /// `status` for people, one line per `\n`.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let oldest = match self.oldest_queued_seconds {
            Some(age) => format!(" (oldest queued {} ago)", human_duration(age as f64)),
            None => String::new(),
        };
        let in_flight = self.in_flight_paths.len();
        s += &format!(
            "queued:       {}{oldest}\nin flight:    {in_flight}\n",
            self.queued
        );
        for p in self.in_flight_paths.iter().take(TEXT_IN_FLIGHT) {
            s += &format!("  uploading {p}\n");
        }
        if in_flight > TEXT_IN_FLIGHT {
            s += &format!("  ... and {} more\n", in_flight - TEXT_IN_FLIGHT);
        }
        let rate = format!("{:.1}", self.upload_rate_per_minute);
        s += &format!(
            "uploaded:     {} since start ({rate} paths/min lately)\n",
            self.uploaded
        );
        let spool = match (self.spool_files, self.spool_paths) {
            (0, _) => "empty".to_string(),
            (files, paths) => {
                format!("{files} file(s) with {paths} path(s) left by the hook, not yet queued")
            }
        };
        s += &format!(
            "spool:        {spool}\ndropped:      {} since start\n",
            self.dropped
        );
        s += &format!("backing off:  {}\n", self.backing_off);
        let note = if self.failed.is_empty() {
            ""
        } else {
            " (given up on; requeue or drop them)"
        };
        s += &format!("failed:       {}{note}\n", self.failed.len());
        s += &format!("failed calls: {} since start\n", self.failed_calls);
        let target = self
            .target
            .as_deref()
            .unwrap_or("none (upload-to is not set)");
        s += &format!("target:       {}\n", one_line(target));
        if self.shown().count() > 1 {
            for t in self.shown() {
                s +=
                    &format!(
                    "  {}: {}, {} queued, {} delivered since start, {} backing off, {} failed\n",
                    one_line(&t.label), t.state(), t.queued, t.delivered, t.backing_off, t.failed
                );
                if let Some(e) = &t.last_error {
                    s += &format!("    last error: {}\n", one_line(e));
                }
            }
        }
        s += &format!(
            "signing:      {}\n",
            if self.signing { "on" } else { "off" }
        );
        s += &format!(
            "uptime:       {}\n",
            human_duration(self.uptime_seconds as f64)
        );
        s += &format!("version:      {}\n", crate::VERSION);
        for (attempts, next, path, error) in self.backoff.iter().take(LISTED) {
            // As shown in JSON: to a tenth of a second.
            let next = (next * 10.0).round() / 10.0;
            let when = match next > 0.0 {
                true => format!("next try in {}", human_duration(next)),
                false => "retrying now".to_string(),
            };
            s += &format!(
                "  {path}: attempt {attempts} failed, {when}: {}\n",
                one_line(error)
            );
        }
        s += &more(
            self.backing_off,
            self.backoff.len().min(LISTED),
            "",
            "soonest",
        );
        for (path, g, ago) in self.failed.iter().take(LISTED) {
            s += &format!(
                "  {path}: FAILED, given up on {} ago after {} attempts: {}\n",
                human_duration(*ago as f64),
                g.attempts,
                one_line(&g.error)
            );
        }
        s + &more(
            self.failed.len(),
            self.failed.len().min(LISTED),
            " failed",
            "oldest",
        )
    }

    /// `status json`: one JSON object on one line.
    pub fn json(&self) -> String {
        let mut parts: Vec<String> = FIELDS
            .iter()
            .filter(|f| !f.0.is_empty())
            .map(|(key, _, _, _, value)| {
                let v = match value(self) {
                    Value::Num(Some(n), d) => format!("{n:.d$}"),
                    Value::Num(None, _) | Value::Text(None) => "null".to_string(),
                    Value::Text(Some(t)) => json_string(&t),
                    Value::Flag(b) => b.to_string(),
                };
                format!("\"{key}\":{v}")
            })
            .collect();
        let list = |items: Vec<String>| format!("[{}]", items.join(","));
        let backoff = self.backoff.iter().take(LISTED).map(|(attempts, next, path, error)| {
            format!(
                "{{\"path\":{},\"attempts\":{attempts},\"next_try_seconds\":{next:.1},\"last_error\":{}}}",
                json_string(path.as_str()), json_string(&one_line(error))
            )
        });
        parts.push(format!("\"backoff\":{}", list(backoff.collect())));
        let failed =
            self.failed.iter().take(LISTED).map(|(path, g, ago)| {
                format!(
                "{{\"path\":{},\"attempts\":{},\"given_up_seconds_ago\":{ago},\"last_error\":{}}}",
                json_string(path.as_str()), g.attempts, json_string(&one_line(&g.error))
            )
            });
        parts.push(format!("\"failed_paths\":{}", list(failed.collect())));
        let in_flight = self
            .in_flight_paths
            .iter()
            .take(LISTED)
            .map(|p| json_string(p.as_str()));
        parts.push(format!("\"in_flight_paths\":{}", list(in_flight.collect())));
        let targets = self.shown().map(|t| {
            format!(
                "{{\"target\":{},\"id\":\"{}\",\"state\":\"{}\",\"queued\":{},\"delivered\":{},\"backing_off\":{},\"failed\":{},\"given_up_total\":{},\"failed_calls\":{},\"last_error\":{}}}",
                json_string(&t.label), t.id, t.state(), t.queued, t.delivered, t.backing_off, t.failed,
                t.given_up_total, t.failed_calls,
                t.last_error.as_deref().map_or("null".to_string(), |e| json_string(&one_line(e)))
            )
        });
        parts.push(format!("\"targets\":{}", list(targets.collect())));
        format!("{{{}}}\n", parts.join(","))
    }

    /// The Prometheus text exposition of the snapshot.
    pub fn prometheus(&self) -> String {
        const M: &str = "nix_post_build_hook_queue_";
        let mut text = String::new();
        for (_, name, kind, help, value) in FIELDS.iter().filter(|f| !f.1.is_empty()) {
            if let Value::Num(n, d) = value(self) {
                let n = n.unwrap_or(0.0);
                text += &format!(
                    "# HELP {M}{name} {help}\n# TYPE {M}{name} {kind}\n{M}{name} {n:.d$}\n"
                );
            }
        }
        let targets: Vec<&TargetSnapshot> = self.shown().collect();
        for (name, kind, help, value) in PER_TARGET.iter().filter(|_| !targets.is_empty()) {
            text += &format!("# HELP {M}{name} {help}\n# TYPE {M}{name} {kind}\n");
            for t in &targets {
                text += &format!(
                    "{M}{name}{{target=\"{}\"}} {}\n",
                    label_value(&t.label),
                    value(t)
                );
            }
        }
        text += &format!(
            "# HELP {M}upload_duration_seconds Time spent in successful upload calls.\n# TYPE {M}upload_duration_seconds summary\n{M}upload_duration_seconds_sum {:.6}\n{M}upload_duration_seconds_count {}\n",
            self.upload_seconds, self.upload_batches
        );
        text
    }
}

impl TargetSnapshot {
    /// `ok`, or `failing` when its last call failed.
    pub fn state(&self) -> &'static str {
        match self.last_error {
            Some(_) => "failing",
            None => "ok",
        }
    }
}

/// Paths uploaded per minute over the last [`RATE_WINDOW`] (or since start,
/// when that is shorter).
fn upload_rate_per_minute(stats: &Stats) -> f64 {
    let now = Instant::now();
    let window = RATE_WINDOW.min(now.duration_since(stats.started));
    let recent = stats
        .recent_uploads
        .iter()
        .filter(|(t, _)| now.duration_since(*t) <= window);
    recent.map(|(_, n)| n).sum::<u64>() as f64 * 60.0 / window.as_secs_f64().max(1.0)
}

/// The line saying how many of `total` paths the list of `shown` left out
/// (empty when none): `... and 3 more failed (status lists the 100 oldest)`.
fn more(total: usize, shown: usize, what: &str, which: &str) -> String {
    match total > shown {
        true => format!(
            "  ... and {} more{what} (status lists the {shown} {which})\n",
            total - shown
        ),
        false => String::new(),
    }
}

/// A duration for people: `0.4s`, `42s`, `5m 3s`, `1h 3m`, `2d 5h`.
/// Fractions are shown only under 10 seconds.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds <= 0.0 {
        return "0s".to_string();
    }
    if seconds < 10.0 && seconds.fract() != 0.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => out += &format!("\\u{:04x}", c as u32),
            c => out.push(c),
        }
    }
    out + "\""
}

/// `text` as a Prometheus label value (between the quotes): `\\`, `"` and
/// line breaks escaped.
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes `text` to `path` atomically: a temporary file in the same
/// directory, then a rename over the old one, so a reader (node-exporter's
/// textfile collector) never sees half a file. The temporary name is unique
/// per call (two threads may write at once: the metrics thread and the stop
/// thread) and ends in `.tmp`, which the collector ignores.
/// The file is world-readable (0644).
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = std::path::PathBuf::from(tmp);
    // 0644 whatever the umask (UMask=0077 under the NixOS module): the file
    // holds counters only, and node-exporter reads it as another user.
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut f| {
            use std::io::Write;
            f.write_all(text.as_bytes())?;
            f.set_permissions(std::fs::Permissions::from_mode(0o644))
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "npbhq-status-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const STORE: &str = "/nix/store";

    fn path(name: &str) -> StorePath {
        StorePath::parse(
            &format!("{STORE}/0123456789abcdfghijklmnpqrsvwxyz-{name}"),
            STORE,
        )
        .unwrap()
    }

    #[test]
    fn snapshot_reports_backoff_masked_and_paths_being_retried_as_due() {
        let dir = temp_dir("snap");
        let (journal, _) = Journal::open(&dir, STORE).unwrap();
        journal.append(&[path("a"), path("b")]).unwrap();
        let shared = Shared::new(&[Target::url("ssh://u:pw@h")]);
        {
            let mut s = shared.lock();
            let error = "cannot open 'ssh://u:pw@h?secret-key=/k'\nsecond line".into();
            let next_try = Some(Instant::now() + Duration::from_secs(60));
            let b = Backoff {
                attempts: 2,
                next_try,
                last_error: error,
            };
            s.targets[0].backoff.insert(path("a"), b);
            // Being retried by the worker.
            let b = Backoff {
                attempts: 1,
                next_try: None,
                last_error: "x".into(),
            };
            s.targets[0].backoff.insert(path("b"), b);
        }
        let snap = Snapshot::take(&journal, &shared, &dir.join("spool"), true);
        assert_eq!(snap.queued, 2);
        assert_eq!(snap.backoff[0].1, 0.0, "being retried: due now");
        assert_eq!(snap.backoff[0].2, path("b"));
        assert!((50.0..=60.0).contains(&snap.backoff[1].1));
        let text = snap.text();
        assert!(text.starts_with("queued:       2 (oldest queued"), "{text}");
        assert!(text.contains("\nbacking off:  2\n"), "{text}");
        assert!(text.contains("\ntarget:       ssh://u:***@h\n"), "{text}");
        let a = format!("  {}: attempt 2 failed, next try in ", path("a"));
        let line = text.lines().find(|l| l.starts_with(&a)).unwrap();
        assert!(
            line.ends_with(": cannot open 'ssh://u:***@h?secret-key=***' second line"),
            "{line}"
        );
        assert!(text.contains(&format!(
            "  {}: attempt 1 failed, retrying now: x\n",
            path("b")
        )));
        let json = snap.json();
        assert_eq!(json.lines().count(), 1, "{json}");
        assert!(
            json.contains("\"queued\":2,") && json.contains("\"backing_off\":2,"),
            "{json}"
        );
        for shown in [&text, &json] {
            assert!(!shown.contains("pw") && !shown.contains("/k"), "{shown}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            uptime_seconds: 3725,
            queued: 3,
            in_flight_paths: vec![path("d")],
            spool_files: 2,
            spool_paths: 7,
            upload_rate_per_minute: 12.5,
            uploaded: 7,
            dropped: 0,
            failed_calls: 2,
            oldest_queued_seconds: Some(75),
            upload_seconds: 0.25,
            upload_batches: 4,
            signing: false,
            target: None,
            backing_off: 3,
            backoff: vec![
                (1, 0.0, path("a"), "a \"quoted\" \\ path\tand\u{1}".into()),
                (2, 125.3, path("b"), "boom".into()),
            ],
            given_up_total: 1,
            failed: vec![(
                path("c"),
                GivenUp {
                    target: TargetId::of(None),
                    at: 0,
                    attempts: 10,
                    error: "boom".into(),
                },
                65,
            )],
            targets: Vec::new(),
        }
    }

    #[test]
    fn text_shows_durations_and_backoff() {
        let [a, b, c, d] = ["a", "b", "c", "d"].map(path);
        assert_eq!(
            snapshot().text(),
            format!(
                "queued:       3 (oldest queued 1m 15s ago)\n\
                 in flight:    1\n\
                 \x20 uploading {d}\n\
                 uploaded:     7 since start (12.5 paths/min lately)\n\
                 spool:        2 file(s) with 7 path(s) left by the hook, not yet queued\n\
                 dropped:      0 since start\n\
                 backing off:  3\n\
                 failed:       1 (given up on; requeue or drop them)\n\
                 failed calls: 2 since start\n\
                 target:       none (upload-to is not set)\n\
                 signing:      off\n\
                 uptime:       1h 2m\n\
                 version:      {}\n\
                 \x20 {a}: attempt 1 failed, retrying now: a \"quoted\" \\ path\tand\u{1}\n\
                 \x20 {b}: attempt 2 failed, next try in 2m 5s: boom\n\
                 \x20 ... and 1 more (status lists the 2 soonest)\n\
                 \x20 {c}: FAILED, given up on 1m 5s ago after 10 attempts: boom\n",
                crate::VERSION
            )
        );
    }

    #[test]
    fn json_is_one_object_with_escaped_strings() {
        let [a, b, c, d] = ["a", "b", "c", "d"].map(path);
        assert_eq!(
            snapshot().json(),
            format!(
                "{{\"version\":\"{}\",\"uptime_seconds\":3725,\"queued\":3,\"in_flight\":1,\
                 \"uploaded\":7,\"dropped\":0,\"failed_calls\":2,\"backing_off\":3,\"failed\":1,\
                 \"oldest_queued_seconds\":75,\"upload_seconds_sum\":0.250,\"upload_batches\":4,\
                 \"upload_rate_per_minute\":12.5,\"spool_files\":2,\"spool_paths\":7,\
                 \"signing\":false,\"target\":null,\
                 \"backoff\":[{{\"path\":\"{a}\",\"attempts\":1,\"next_try_seconds\":0.0,\
                 \"last_error\":\"a \\\"quoted\\\" \\\\ path\\u0009and\\u0001\"}},\
                 {{\"path\":\"{b}\",\"attempts\":2,\"next_try_seconds\":125.3,\"last_error\":\"boom\"}}],\
                 \"failed_paths\":[{{\"path\":\"{c}\",\"attempts\":10,\
                 \"given_up_seconds_ago\":65,\"last_error\":\"boom\"}}],\
                 \"in_flight_paths\":[\"{d}\"],\"targets\":[]}}\n",
                crate::VERSION
            )
        );
        let mut s = snapshot();
        s.oldest_queued_seconds = None;
        s.target = Some("file:///a".into());
        let json = s.json();
        assert!(json.contains("\"oldest_queued_seconds\":null,"), "{json}");
        assert!(json.contains("\"target\":\"file:///a\","), "{json}");
    }

    #[test]
    fn durations_for_people() {
        let cases = [
            (0.0, "0s"),
            (f64::NAN, "0s"),
            (0.4, "0.4s"),
            (9.0, "9s"),
            (42.4, "42s"),
            (63.0, "1m 3s"),
            (3605.0, "1h 0m"),
            (90_000.0, "1d 1h"),
        ];
        for (secs, text) in cases {
            assert_eq!(human_duration(secs), text, "{secs}");
        }
    }

    #[test]
    fn prometheus_text_declares_every_sample() {
        let mut snap = snapshot();
        snap.in_flight_paths = Vec::new();
        snap.oldest_queued_seconds = Some(9);
        snap.targets = ["file:///a", "upload-command: x \"y\""]
            .iter()
            .map(|label| TargetSnapshot {
                id: TargetId::of(Some(label)),
                label: label.to_string(),
                queued: 2,
                delivered: 3,
                backing_off: 1,
                failed: 0,
                given_up_total: 0,
                failed_calls: 4,
                last_error: None,
            })
            .collect();
        let text = snap.prometheus();
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let (name, value) = line.rsplit_once(' ').unwrap();
                let name = name.split_once('{').map_or(name, |(n, _)| n);
                assert!(value.parse::<f64>().is_ok(), "{line}");
                assert!(
                    declared.iter().any(|d| name == d
                        || name == format!("{d}_sum")
                        || name == format!("{d}_count")),
                    "{line}"
                );
            }
        }
        for sample in [
            "queued 3",
            "in_flight 0",
            "given_up_total 1",
            "oldest_queued_age_seconds 9",
            "upload_duration_seconds_count 4",
            "target_delivered_total{target=\"file:///a\"} 3",
            "target_up{target=\"upload-command: x \\\"y\\\"\"} 1",
        ] {
            assert!(
                text.contains(&format!("\nnix_post_build_hook_queue_{sample}\n")),
                "{sample}\n{text}"
            );
        }
    }

    #[test]
    fn write_atomically_replaces_and_leaves_no_temporary_file() {
        let dir = temp_dir("atomic");
        let file = dir.join("m.prom");
        write_atomically(&file, "one\n").unwrap();
        write_atomically(&file, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "two\n");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert!(write_atomically(&dir.join("missing/m.prom"), "x").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
