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
#[derive(Debug, Default)]
pub struct Stats {
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
        let paths = self.targets.iter().flat_map(|t| t.backoff.keys());
        paths.collect::<HashSet<_>>().len()
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
}

/// What the daemon's threads share besides the journal.
pub struct Shared {
    stats: Mutex<Stats>,
    /// When the daemon started.
    pub started: Instant,
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
            running: (0..=targets.len()).map(|_| Arc::default()).collect(),
            stats: Mutex::new(Stats {
                targets: targets.iter().map(target).collect(),
                ..Stats::default()
            }),
            started: Instant::now(),
            stopping: AtomicBool::new(false),
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
    /// The scalar fields, as `status json` names and orders them.
    pub fields: Vec<(&'static str, Value)>,
    /// The paths of the calls in progress (and of the batch being prepared).
    pub in_flight_paths: Vec<StorePath>,
    /// Backing-off paths, soonest first: (attempts, seconds to next try,
    /// path, last error), one per path and target; with several targets
    /// the error starts with the target's label.
    pub backoff: Vec<(u32, f64, StorePath, String)>,
    /// Paths given up on for a target now, oldest first, with how long ago.
    pub failed: Vec<(StorePath, GivenUp, u64)>,
    /// Each target's state.
    pub targets: Vec<TargetSnapshot>,
}

/// A field's value: a number with its decimals (`None`: unknown, `null`),
/// text, or a flag.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number.
    Num(Option<f64>, usize),
    /// Text.
    Text(Option<String>),
    /// A flag.
    Flag(bool),
}

/// The metrics: `FIELD NAME TYPE HELP`, FIELD naming the value shown.
const METRICS: &str = "\
queued queued gauge Paths journaled and not yet uploaded.
in_flight in_flight gauge Paths in the calls in progress.
backing_off backing_off gauge Paths waiting to be retried after a failure.
spool_files spool_files gauge Request files the hook left in the spool, not yet queued.
spool_paths spool_paths gauge Paths in those spool files.
failed failed gauge Paths given up on after repeated failures, kept until requeued or dropped.
given_up_total given_up_total counter Paths given up on after repeated failures since the daemon started.
uploaded uploaded_total counter Paths signed and uploaded to every target since the daemon started.
dropped dropped_total counter Paths given up on since the daemon started.
failed_calls failed_calls_total counter Failed nix calls since the daemon started.
oldest_queued_seconds oldest_queued_age_seconds gauge Age of the oldest queued path (0 when the queue is empty).";

/// The per-target metrics: `NAME TYPE HELP`, in the order of
/// [`TargetSnapshot::numbers`].
const TARGET_METRICS: &str = "\
target_queued gauge Queued paths this target does not have yet (those given up on aside).
target_delivered_total counter Paths this target took since the daemon started.
target_backing_off gauge Paths waiting to be retried on this target after a failure.
target_failed gauge Paths given up on for this target, kept until requeued or dropped.
target_given_up_total counter Paths given up on for this target since the daemon started.
target_failed_calls_total counter Failed calls to this target since the daemon started.
target_up gauge 1 when the last call to this target went through (or none was made), 0 when it failed.";

/// A field that only the metrics show.
const METRIC_ONLY: &str = "given_up_total";

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

impl TargetSnapshot {
    /// `ok`, or `failing` when its last call failed.
    pub fn state(&self) -> &'static str {
        match self.last_error {
            Some(_) => "failing",
            None => "ok",
        }
    }

    /// Its numbers, in the order of `status json` and [`TARGET_METRICS`].
    fn numbers(&self) -> [(&'static str, u64); 7] {
        [
            ("queued", self.queued as u64),
            ("delivered", self.delivered),
            ("backing_off", self.backing_off as u64),
            ("failed", self.failed as u64),
            ("given_up_total", self.given_up_total),
            ("failed_calls", self.failed_calls),
            ("up", u64::from(self.last_error.is_none())),
        ]
    }
}

impl Snapshot {
    /// Takes a snapshot of the journal and the statistics, secrets masked.
    pub fn take(journal: &Journal, shared: &Shared, spool_dir: &Path, signing: bool) -> Snapshot {
        let now = SystemTime::now().duration_since(UNIX_EPOCH);
        let now = now.map_or(0, |d| d.as_secs());
        let oldest = journal
            .oldest()
            .map(|e| now.saturating_sub(e.queued_at) as f64);
        let ids: Vec<(TargetId, String)> = {
            let stats = shared.lock();
            stats
                .targets
                .iter()
                .map(|t| (t.id, t.label.clone()))
                .collect()
        };
        // Errors quote nix, which may repeat a target with its password.
        let tagged = |label: &str, error: &str| match ids.len() {
            1 => redact::text(error),
            _ => redact::text(&format!("{label}: {error}")),
        };
        let (mut failed, mut pending) = (Vec::new(), Vec::new());
        for (id, label) in &ids {
            let given_up = journal.given_up_up_to(u64::MAX, *id);
            let waiting = journal.count_waiting_up_to(u64::MAX, &[*id]);
            pending.push((waiting, given_up.len()));
            for (p, mut g) in given_up {
                g.error = tagged(label, &g.error);
                failed.push((p, g.clone(), now.saturating_sub(g.at)));
            }
        }
        let (spool_files, spool_paths) = crate::spool::backlog(spool_dir);
        let stats = shared.lock();
        let (mut backoff, mut in_flight) = (Vec::new(), stats.in_flight_paths.clone());
        for t in &stats.targets {
            backoff.extend(t.backoff.iter().map(|(p, b)| {
                let next = b
                    .next_try
                    .map(|t| t.saturating_duration_since(Instant::now()));
                let next = next.map_or(0.0, |d| d.as_secs_f64());
                (b.attempts, next, p.clone(), tagged(&t.label, &b.last_error))
            }));
            in_flight.extend(t.in_flight.iter().cloned());
        }
        let mut seen = HashSet::new();
        in_flight.retain(|p| seen.insert(p.clone()));
        backoff.sort_by(|a, b| a.1.total_cmp(&b.1));
        let targets = stats.targets.iter().zip(pending);
        let targets = targets.map(|(t, (queued, failed))| TargetSnapshot {
            id: t.id,
            label: t.label.clone(),
            queued,
            delivered: t.delivered,
            backing_off: t.backoff.len(),
            failed,
            given_up_total: t.given_up,
            failed_calls: t.failed_calls,
            last_error: t.last_error.as_deref().map(redact::text),
        });
        let labels = ids.iter().map(|(_, l)| l.as_str()).filter(|l| *l != "-");
        let labels: Vec<&str> = labels.collect();
        let n = |n: u64| Value::Num(Some(n as f64), 0);
        let fields = vec![
            ("version", Value::Text(Some(crate::VERSION.into()))),
            ("uptime_seconds", n(shared.started.elapsed().as_secs())),
            ("queued", n(journal.len() as u64)),
            ("in_flight", n(in_flight.len() as u64)),
            ("uploaded", n(stats.uploaded)),
            ("dropped", n(stats.dropped)),
            ("failed_calls", n(stats.failed_calls)),
            ("backing_off", n(stats.backing_off() as u64)),
            ("failed", n(failed.len() as u64)),
            ("oldest_queued_seconds", Value::Num(oldest, 0)),
            (
                "upload_seconds_sum",
                Value::Num(Some(stats.upload_seconds), 3),
            ),
            ("upload_batches", n(stats.upload_batches)),
            (
                "upload_rate_per_minute",
                Value::Num(Some(upload_rate(&stats, shared.started)), 1),
            ),
            ("spool_files", n(spool_files as u64)),
            ("spool_paths", n(spool_paths as u64)),
            ("signing", Value::Flag(signing)),
            (
                "target",
                Value::Text((!labels.is_empty()).then(|| labels.join(", "))),
            ),
            (METRIC_ONLY, n(stats.given_up)),
        ];
        Snapshot {
            fields,
            in_flight_paths: in_flight,
            backoff,
            failed,
            targets: targets.collect(),
        }
    }

    /// The value of field `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|f| f.0 == key).map(|f| &f.1)
    }

    /// The number in field `key` (0 when unknown).
    pub fn num(&self, key: &str) -> f64 {
        match self.get(key) {
            Some(Value::Num(Some(n), _)) => *n,
            _ => 0.0,
        }
    }

    /// The targets shown (not the "sign only" one).
    fn shown(&self) -> impl Iterator<Item = &TargetSnapshot> {
        self.targets.iter().filter(|t| t.label != "-")
    }

    /// `status` for people, one line per `\n`.
    pub fn text(&self) -> String {
        let n = |key| self.num(key) as u64;
        let human = |key| human_duration(self.num(key));
        let row = |label: &str, value: String| format!("{:<14}{value}\n", format!("{label}:"));
        let oldest = match self.get("oldest_queued_seconds") {
            Some(Value::Num(Some(_), _)) => {
                format!(" (oldest queued {} ago)", human("oldest_queued_seconds"))
            }
            _ => String::new(),
        };
        let in_flight = self.in_flight_paths.len();
        let mut s = row("queued", format!("{}{oldest}", n("queued")));
        s += &row("in flight", in_flight.to_string());
        for p in self.in_flight_paths.iter().take(TEXT_IN_FLIGHT) {
            s += &format!("  uploading {p}\n");
        }
        if in_flight > TEXT_IN_FLIGHT {
            s += &format!("  ... and {} more\n", in_flight - TEXT_IN_FLIGHT);
        }
        let rate = self.num("upload_rate_per_minute");
        s += &row(
            "uploaded",
            format!("{} since start ({rate:.1} paths/min lately)", n("uploaded")),
        );
        s += &row(
            "spool",
            match (n("spool_files"), n("spool_paths")) {
                (0, _) => "empty".to_string(),
                (files, paths) => {
                    format!("{files} file(s) with {paths} path(s) left by the hook, not yet queued")
                }
            },
        );
        s += &row("dropped", format!("{} since start", n("dropped")));
        s += &row("backing off", n("backing_off").to_string());
        let note = match self.failed.is_empty() {
            true => "",
            false => " (given up on; requeue or drop them)",
        };
        s += &row("failed", format!("{}{note}", self.failed.len()));
        s += &row("failed calls", format!("{} since start", n("failed_calls")));
        s += &row(
            "target",
            match self.get("target") {
                Some(Value::Text(Some(t))) => one_line(t),
                _ => "none (upload-to is not set)".to_string(),
            },
        );
        for t in self.shown().filter(|_| self.shown().count() > 1) {
            let (label, state) = (one_line(&t.label), t.state());
            s += &format!("  {label}: {state}, {} queued, {} delivered since start, {} backing off, {} failed\n", t.queued, t.delivered, t.backing_off, t.failed);
            if let Some(e) = &t.last_error {
                s += &format!("    last error: {}\n", one_line(e));
            }
        }
        let signing = self.get("signing") == Some(&Value::Flag(true));
        s += &row("signing", if signing { "on" } else { "off" }.to_string());
        s += &row("uptime", human("uptime_seconds"));
        s += &row("version", crate::VERSION.to_string());
        for (attempts, next, path, error) in self.backoff.iter().take(LISTED) {
            // As `status json` shows it: to a tenth of a second.
            let when = match (next * 10.0).round() / 10.0 {
                next if next > 0.0 => format!("next try in {}", human_duration(next)),
                _ => "retrying now".to_string(),
            };
            let error = one_line(error);
            s += &format!("  {path}: attempt {attempts} failed, {when}: {error}\n");
        }
        let shown = self.backoff.len().min(LISTED);
        s += &more(n("backing_off") as usize, shown, "", "soonest");
        for (path, g, ago) in self.failed.iter().take(LISTED) {
            let (ago, attempts, e) = (human_duration(*ago as f64), g.attempts, one_line(&g.error));
            s += &format!(
                "  {path}: FAILED, given up on {ago} ago after {attempts} attempts: {e}\n"
            );
        }
        let shown = self.failed.len().min(LISTED);
        s + &more(self.failed.len(), shown, " failed", "oldest")
    }

    /// `status json`: one JSON object on one line.
    pub fn json(&self) -> String {
        let fields = self.fields.iter().filter(|f| f.0 != METRIC_ONLY);
        let mut parts: Vec<String> = fields
            .map(|(key, value)| {
                let v = match value {
                    Value::Num(Some(n), d) => format!("{n:.d$}"),
                    Value::Num(None, _) | Value::Text(None) => "null".to_string(),
                    Value::Text(Some(t)) => json_string(t),
                    Value::Flag(b) => b.to_string(),
                };
                format!("\"{key}\":{v}")
            })
            .collect();
        let list = |key: &str, items: Vec<String>| format!("\"{key}\":[{}]", items.join(","));
        let backoff = self.backoff.iter().take(LISTED).map(|(attempts, next, path, error)| {
            let (path, error) = (json_string(path.as_str()), json_string(&one_line(error)));
            format!("{{\"path\":{path},\"attempts\":{attempts},\"next_try_seconds\":{next:.1},\"last_error\":{error}}}")
        });
        parts.push(list("backoff", backoff.collect()));
        let failed = self.failed.iter().take(LISTED).map(|(path, g, ago)| {
            let (path, error) = (json_string(path.as_str()), json_string(&one_line(&g.error)));
            let attempts = g.attempts;
            format!("{{\"path\":{path},\"attempts\":{attempts},\"given_up_seconds_ago\":{ago},\"last_error\":{error}}}")
        });
        parts.push(list("failed_paths", failed.collect()));
        let in_flight = self.in_flight_paths.iter().take(LISTED);
        parts.push(list(
            "in_flight_paths",
            in_flight.map(|p| json_string(p.as_str())).collect(),
        ));
        let targets = self.shown().map(|t| {
            let (label, id, state) = (json_string(&t.label), t.id, t.state());
            let numbers = t.numbers().map(|(k, v)| format!(",\"{k}\":{v}"));
            let error = t.last_error.as_deref().map(|e| json_string(&one_line(e)));
            let error = error.unwrap_or_else(|| "null".to_string());
            let numbers = numbers[..6].concat();
            format!("{{\"target\":{label},\"id\":\"{id}\",\"state\":\"{state}\"{numbers},\"last_error\":{error}}}")
        });
        parts.push(list("targets", targets.collect()));
        format!("{{{}}}\n", parts.join(","))
    }

    /// The Prometheus text exposition of the snapshot.
    pub fn prometheus(&self) -> String {
        const M: &str = "nix_post_build_hook_queue_";
        let mut text = String::new();
        let declare = |text: &mut String, line: &str| {
            let mut words = line.splitn(3, ' ');
            let (name, kind) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let help = words.next().unwrap_or("");
            *text += &format!("# HELP {M}{name} {help}\n# TYPE {M}{name} {kind}\n");
            name.to_string()
        };
        for line in METRICS.lines() {
            let (key, line) = line.split_once(' ').unwrap_or((line, ""));
            let name = declare(&mut text, line);
            text += &format!("{M}{name} {}\n", self.num(key));
        }
        let targets: Vec<&TargetSnapshot> = self.shown().collect();
        for (i, line) in TARGET_METRICS
            .lines()
            .enumerate()
            .filter(|_| !targets.is_empty())
        {
            let name = declare(&mut text, line);
            for t in &targets {
                let label = label_value(&t.label);
                text += &format!("{M}{name}{{target=\"{label}\"}} {}\n", t.numbers()[i].1);
            }
        }
        let (sum, count) = (self.num("upload_seconds_sum"), self.num("upload_batches"));
        declare(
            &mut text,
            "upload_duration_seconds summary Time spent in successful upload calls.",
        );
        text + &format!(
            "{M}upload_duration_seconds_sum {sum:.6}\n{M}upload_duration_seconds_count {count}\n"
        )
    }
}

/// Paths uploaded per minute over the last [`RATE_WINDOW`] (or since start,
/// when that is shorter).
fn upload_rate(stats: &Stats, started: Instant) -> f64 {
    let now = Instant::now();
    let window = RATE_WINDOW.min(now.duration_since(started));
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
        assert_eq!(snap.num("queued"), 2.0);
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
        let n = |n: f64, d: usize| Value::Num(Some(n), d);
        Snapshot {
            fields: vec![
                ("version", Value::Text(Some(crate::VERSION.into()))),
                ("uptime_seconds", n(3725.0, 0)),
                ("queued", n(3.0, 0)),
                ("in_flight", n(1.0, 0)),
                ("uploaded", n(7.0, 0)),
                ("dropped", n(0.0, 0)),
                ("failed_calls", n(2.0, 0)),
                ("backing_off", n(3.0, 0)),
                ("failed", n(1.0, 0)),
                ("oldest_queued_seconds", n(75.0, 0)),
                ("upload_seconds_sum", n(0.25, 3)),
                ("upload_batches", n(4.0, 0)),
                ("upload_rate_per_minute", n(12.5, 1)),
                ("spool_files", n(2.0, 0)),
                ("spool_paths", n(7.0, 0)),
                ("signing", Value::Flag(false)),
                ("target", Value::Text(None)),
                (METRIC_ONLY, n(1.0, 0)),
            ],
            in_flight_paths: vec![path("d")],
            backoff: vec![
                (1, 0.0, path("a"), "a \"quoted\" \\ path\tand\u{1}".into()),
                (2, 125.3, path("b"), "boom".into()),
            ],
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
        s.fields[9].1 = Value::Num(None, 0);
        s.fields[16].1 = Value::Text(Some("file:///a".into()));
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
        snap.fields[3].1 = Value::Num(Some(0.0), 0);
        snap.fields[9].1 = Value::Num(Some(9.0), 0);
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
