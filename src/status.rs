//! What the daemon knows about its own progress besides the journal, and
//! one table of fields that renders it as `status` text, `status json` and
//! Prometheus metrics.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::journal::{GivenUp, Journal, TargetId};
use crate::policy::Failures;
use crate::protocol::one_line;
use crate::redact;
use crate::store_path::StorePath;
use crate::target::Target;

/// The upload rate is measured over this much of the recent past.
const RATE_WINDOW: Duration = Duration::from_secs(300);
/// Most paths listed per kind (backing off, in flight, given up on).
const LISTED: usize = 100;
/// Paths of the calls in progress the text names.
const TEXT_IN_FLIGHT: usize = 5;

/// A path its target's lane still needs: handed over and not tried yet (no
/// attempts), or backing off after a failure.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    /// Failed attempts so far (since the daemon started).
    pub attempts: u32,
    /// Those failures the policy blamed on the path.
    pub failures: Failures,
    /// When it is tried next; `None` while it is being tried.
    pub next_try: Option<Instant>,
    /// What went wrong the last time.
    pub last_error: String,
    /// Signed already, by the front.
    pub signed: bool,
}

/// One target's state since the daemon started.
#[derive(Debug)]
pub struct TargetStats {
    /// The journal's name for the target.
    pub id: TargetId,
    /// How it is shown (secrets masked).
    pub label: String,
    /// The paths its lane still needs.
    pub backoff: HashMap<StorePath, Backoff>,
    /// The paths of its call in progress.
    pub in_flight: Vec<StorePath>,
    /// Paths it took.
    pub delivered: u64,
    /// Paths given up on for it.
    pub given_up: u64,
    /// Failed calls to it.
    pub failed_calls: u64,
    /// The error of its last call, if that call failed.
    pub last_error: Option<String>,
}

/// Counters and state since the daemon started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Paths that every target has (or that were only signed).
    pub uploaded: u64,
    /// Paths dropped (gone from the store, or by an operator).
    pub dropped: u64,
    /// Failed nix calls outside the targets' (signing a batch).
    pub failed_calls: u64,
    /// The batch being prepared (derivations resolved, signed).
    pub in_flight_paths: Vec<StorePath>,
    /// Paths finished in the last [`RATE_WINDOW`], with when.
    recent_uploads: VecDeque<(Instant, u64)>,
    /// Time spent in successful upload calls.
    pub upload_seconds: f64,
    /// Their number.
    pub upload_batches: u64,
    /// In the order of the configuration.
    pub targets: Vec<TargetStats>,
}

impl Stats {
    /// Removes a path from every lane (it is done or dropped).
    pub fn forget(&mut self, path: &StorePath) {
        for t in &mut self.targets {
            t.backoff.remove(path);
        }
    }

    /// Paths backing off on some target, each counted once.
    pub fn backing_off(&self) -> usize {
        let all = self.targets.iter().flat_map(|t| t.backoff.iter());
        let failed = all.filter(|(_, b)| b.attempts > 0).map(|(p, _)| p);
        failed.collect::<HashSet<_>>().len()
    }

    /// Records that `n` paths were uploaded (to every target) now.
    pub fn record_uploads(&mut self, n: u64) {
        self.uploaded += n;
        let recent = &mut self.recent_uploads;
        recent.retain(|(t, _)| t.elapsed() <= RATE_WINDOW);
        recent.push_back((Instant::now(), n));
    }
}

/// What the daemon's threads share besides the journal.
pub struct Shared {
    stats: Mutex<Stats>,
    /// When the daemon started.
    pub started: Instant,
    /// Set when the daemon is stopping: no new connections, no new batches.
    pub stopping: AtomicBool,
    /// Process groups of the nix calls running now (0: none), the front's
    /// then one per target, killed when a stop outlasts its grace period.
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
        let targets: Vec<TargetStats> = targets.iter().map(target).collect();
        Shared {
            running: (0..=targets.len()).map(|_| Arc::default()).collect(),
            stats: Mutex::new(Stats {
                targets,
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

    /// Where the worker's threads publish their calls' process groups.
    pub fn running(&self, i: usize) -> Arc<AtomicU32> {
        Arc::clone(&self.running[i])
    }

    /// The process groups of the nix calls running now.
    pub fn running_pgids(&self) -> Vec<u32> {
        let pgids = self.running.iter().map(|r| r.load(Ordering::SeqCst));
        pgids.filter(|&p| p != 0).collect()
    }
}

/// One consistent look at the daemon, for `status` and the metrics file.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The scalar fields, as `status json` names, orders and writes them.
    fields: Vec<(&'static str, String)>,
    /// The paths of the calls in progress (and of the batch being prepared).
    in_flight_paths: Vec<StorePath>,
    /// Backing-off paths, soonest first: (attempts, seconds to next try,
    /// path, last error), one per path and target; with several targets
    /// the error starts with the target's label.
    backoff: Vec<(u32, f64, StorePath, String)>,
    /// Paths given up on for a target now, oldest first, with how long ago.
    failed: Vec<(StorePath, GivenUp, u64)>,
    targets: Vec<TargetSnapshot>,
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

/// Each target's numbers, in the order of [`TargetSnapshot::numbers`]:
/// `KEY NAME TYPE HELP`, KEY in `status json` (which leaves out the last).
const TARGET_METRICS: &str = "\
queued target_queued gauge Queued paths this target does not have yet (those given up on aside).
delivered target_delivered_total counter Paths this target took since the daemon started.
backing_off target_backing_off gauge Paths waiting to be retried on this target after a failure.
failed target_failed gauge Paths given up on for this target, kept until requeued or dropped.
given_up_total target_given_up_total counter Paths given up on for this target since the daemon started.
failed_calls target_failed_calls_total counter Failed calls to this target since the daemon started.
up target_up gauge 1 when the last call to this target went through (or none was made), 0 when it failed.";

/// A field that only the metrics show.
const METRIC_ONLY: &str = "given_up_total";

/// A line of [`METRICS`] or [`TARGET_METRICS`], split into its words.
fn metric(line: &str) -> [&str; 4] {
    let mut words = line.splitn(4, ' ');
    [(); 4].map(|()| words.next().unwrap_or(""))
}

/// One target's state, for `status` and the metrics.
#[derive(Debug, Clone)]
struct TargetSnapshot {
    id: TargetId,
    /// How it is shown (secrets masked).
    label: String,
    /// As [`TARGET_METRICS`] lists them.
    numbers: [u64; 7],
    /// The error of its last call, if that call failed.
    last_error: Option<String>,
}

impl TargetSnapshot {
    /// `ok`, or `failing` when its last call failed.
    fn state(&self) -> &'static str {
        match self.last_error {
            Some(_) => "failing",
            None => "ok",
        }
    }
}

impl Snapshot {
    /// Takes a snapshot of the journal and the statistics, secrets masked.
    pub fn take(journal: &Journal, shared: &Shared, spool_dir: &Path, signing: bool) -> Snapshot {
        let now = SystemTime::now().duration_since(UNIX_EPOCH);
        let now = now.map_or(0, |d| d.as_secs());
        let oldest = journal.oldest();
        let oldest = oldest.map(|e| now.saturating_sub(e.queued_at));
        let (spool_files, spool_paths) = crate::spool::backlog(spool_dir);
        let stats = shared.lock();
        // Errors quote nix, which may repeat a target with its password.
        let tagged = |label: &str, error: &str| match stats.targets.len() {
            1 => redact::text(error),
            _ => redact::text(&format!("{label}: {error}")),
        };
        let (mut failed, mut backoff, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        let mut in_flight = stats.in_flight_paths.clone();
        for t in &stats.targets {
            let given_up = journal.given_up_up_to(u64::MAX, t.id);
            let gave_up = given_up.len() as u64;
            for (p, mut g) in given_up {
                g.error = tagged(&t.label, &g.error);
                let ago = now.saturating_sub(g.at);
                failed.push((p, g, ago));
            }
            let before = backoff.len();
            for (p, b) in t.backoff.iter().filter(|(_, b)| b.attempts > 0) {
                let next = b
                    .next_try
                    .map(|t| t.saturating_duration_since(Instant::now()));
                let next = next.map_or(0.0, |d| d.as_secs_f64());
                backoff.push((b.attempts, next, p.clone(), tagged(&t.label, &b.last_error)));
            }
            in_flight.extend(t.in_flight.iter().cloned());
            let (queued, backing_off) = (
                journal.count_waiting_up_to(u64::MAX, &[t.id]),
                backoff.len() - before,
            );
            let up = u64::from(t.last_error.is_none());
            targets.push(TargetSnapshot {
                id: t.id,
                label: t.label.clone(),
                numbers: [
                    queued as u64,
                    t.delivered,
                    backing_off as u64,
                    gave_up,
                    t.given_up,
                    t.failed_calls,
                    up,
                ],
                last_error: t.last_error.as_deref().map(redact::text),
            });
        }
        let mut seen = HashSet::new();
        in_flight.retain(|p| seen.insert(p.clone()));
        backoff.sort_by(|a, b| a.1.total_cmp(&b.1));
        let labels = targets
            .iter()
            .map(|t| t.label.as_str())
            .filter(|l| *l != "-");
        let target = Some(labels.collect::<Vec<_>>().join(", "));
        let target = target.filter(|l| !l.is_empty());
        let sum = |i: usize| targets.iter().map(|t| t.numbers[i]).sum::<u64>();
        let n = |n: u64| n.to_string();
        let fields = vec![
            ("version", json_string(crate::VERSION)),
            ("uptime_seconds", n(shared.started.elapsed().as_secs())),
            ("queued", n(journal.len() as u64)),
            ("in_flight", n(in_flight.len() as u64)),
            ("uploaded", n(stats.uploaded)),
            ("dropped", n(stats.dropped)),
            ("failed_calls", n(stats.failed_calls + sum(5))),
            ("backing_off", n(stats.backing_off() as u64)),
            ("failed", n(failed.len() as u64)),
            ("oldest_queued_seconds", oldest.map_or("null".into(), n)),
            ("upload_seconds_sum", format!("{:.3}", stats.upload_seconds)),
            ("upload_batches", n(stats.upload_batches)),
            (
                "upload_rate_per_minute",
                format!("{:.1}", upload_rate(&stats, shared.started)),
            ),
            ("spool_files", n(spool_files as u64)),
            ("spool_paths", n(spool_paths as u64)),
            ("signing", signing.to_string()),
            (
                "target",
                target.as_deref().map_or("null".into(), json_string),
            ),
            (METRIC_ONLY, n(sum(4))),
        ];
        Snapshot {
            fields,
            in_flight_paths: in_flight,
            backoff,
            failed,
            targets,
        }
    }

    /// Field `key` as `status json` writes it.
    fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|f| f.0 == key)
            .map_or("null", |f| &f.1)
    }

    /// The number in field `key` (0 when unknown).
    fn num(&self, key: &str) -> f64 {
        self.get(key).parse().unwrap_or(0.0)
    }

    /// The targets shown (not the "sign only" one).
    fn shown(&self) -> impl Iterator<Item = &TargetSnapshot> {
        self.targets.iter().filter(|t| t.label != "-")
    }

    /// `status` for people: one row per field, with what it lists below it.
    pub fn text(&self) -> String {
        let n = |key| self.num(key) as u64;
        let oldest = match self.get("oldest_queued_seconds") {
            "null" => String::new(),
            _ => format!(
                " (oldest queued {} ago)",
                human_duration(n("oldest_queued_seconds") as f64)
            ),
        };
        let paths = &self.in_flight_paths;
        let mut in_flight = paths.len().to_string();
        for p in paths.iter().take(TEXT_IN_FLIGHT) {
            in_flight += &format!("\n  uploading {p}");
        }
        if paths.len() > TEXT_IN_FLIGHT {
            in_flight += &format!("\n  ... and {} more", paths.len() - TEXT_IN_FLIGHT);
        }
        let rate = self.num("upload_rate_per_minute");
        let spool = match (n("spool_files"), n("spool_paths")) {
            (0, _) => "empty".to_string(),
            (f, p) => format!("{f} file(s) with {p} path(s) left by the hook, not yet queued"),
        };
        let note = match self.failed.is_empty() {
            true => "",
            false => " (given up on; requeue or drop them)",
        };
        let labels: Vec<String> = self.shown().map(|t| one_line(&t.label)).collect();
        let mut target = match labels.is_empty() {
            true => "none (upload-to is not set)".to_string(),
            false => labels.join(", "),
        };
        for t in self.shown().filter(|_| self.shown().count() > 1) {
            let ([queued, delivered, backing_off, failed, ..], label) =
                (t.numbers, one_line(&t.label));
            target += &format!("\n  {label}: {}, {queued} queued, {delivered} delivered since start, {backing_off} backing off, {failed} failed", t.state());
            if let Some(e) = &t.last_error {
                target += &format!("\n    last error: {}", one_line(e));
            }
        }
        let signing = if self.get("signing") == "true" {
            "on"
        } else {
            "off"
        };
        let rows = [
            ("queued", format!("{}{oldest}", n("queued"))),
            ("in flight", in_flight),
            (
                "uploaded",
                format!("{} since start ({rate:.1} paths/min lately)", n("uploaded")),
            ),
            ("spool", spool),
            ("dropped", format!("{} since start", n("dropped"))),
            ("backing off", n("backing_off").to_string()),
            ("failed", format!("{}{note}", self.failed.len())),
            ("failed calls", format!("{} since start", n("failed_calls"))),
            ("target", target),
            ("signing", signing.into()),
            ("uptime", human_duration(self.num("uptime_seconds"))),
            ("version", crate::VERSION.to_string()),
        ];
        let row = |(label, v): &(&str, String)| format!("{:<14}{v}\n", format!("{label}:"));
        let mut s: String = rows.iter().map(row).collect();
        for (attempts, next, path, error) in self.backoff.iter().take(LISTED) {
            // As `status json` shows it: to a tenth of a second.
            let when = match (next * 10.0).round() / 10.0 {
                next if next > 0.0 => format!("next try in {}", human_duration(next)),
                _ => "retrying now".to_string(),
            };
            let error = one_line(error);
            s += &format!("  {path}: attempt {attempts} failed, {when}: {error}\n");
        }
        s += &more(n("backing_off") as usize, self.backoff.len(), "", "soonest");
        for (path, g, ago) in self.failed.iter().take(LISTED) {
            let (ago, n, e) = (human_duration(*ago as f64), g.attempts, one_line(&g.error));
            s += &format!("  {path}: FAILED, given up on {ago} ago after {n} attempts: {e}\n");
        }
        s + &more(self.failed.len(), self.failed.len(), " failed", "oldest")
    }

    /// `status json`: one JSON object on one line.
    pub fn json(&self) -> String {
        let fields = self.fields.iter().filter(|f| f.0 != METRIC_ONLY);
        let mut parts: Vec<String> = fields.map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let list = |key: &str, items: Vec<String>| format!("\"{key}\":[{}]", items.join(","));
        let path = |p: &StorePath| json_string(p.as_str());
        let error = |e: &str| json_string(&one_line(e));
        let backoff = self.backoff.iter().take(LISTED).map(|(n, next, p, e)| {
            let (p, e) = (path(p), error(e));
            format!("{{\"path\":{p},\"attempts\":{n},\"next_try_seconds\":{next:.1},\"last_error\":{e}}}")
        });
        parts.push(list("backoff", backoff.collect()));
        let failed = self.failed.iter().take(LISTED).map(|(p, g, ago)| {
            let (p, n, e) = (path(p), g.attempts, error(&g.error));
            format!("{{\"path\":{p},\"attempts\":{n},\"given_up_seconds_ago\":{ago},\"last_error\":{e}}}")
        });
        parts.push(list("failed_paths", failed.collect()));
        let in_flight = self.in_flight_paths.iter().take(LISTED).map(path);
        parts.push(list("in_flight_paths", in_flight.collect()));
        let targets = self.shown().map(|t| {
            let (label, id, state) = (json_string(&t.label), t.id, t.state());
            let keys = TARGET_METRICS.lines().map(|l| metric(l)[0]);
            let numbers = keys.zip(t.numbers).take(6).map(|(k, v)| format!(",\"{k}\":{v}"));
            let numbers: String = numbers.collect();
            let e = t.last_error.as_deref().map_or("null".to_string(), error);
            format!("{{\"target\":{label},\"id\":\"{id}\",\"state\":\"{state}\"{numbers},\"last_error\":{e}}}")
        });
        parts.push(list("targets", targets.collect()));
        format!("{{{}}}\n", parts.join(","))
    }

    /// The Prometheus text exposition of the snapshot.
    pub fn prometheus(&self) -> String {
        let mut text = String::new();
        for [key, name, kind, help] in METRICS.lines().map(metric) {
            text += &format!("{}{M}{name} {}\n", declare(name, kind, help), self.num(key));
        }
        let targets: Vec<&TargetSnapshot> = self.shown().collect();
        let lines = TARGET_METRICS.lines().filter(|_| !targets.is_empty());
        for (i, [_, name, kind, help]) in lines.map(metric).enumerate() {
            text += &declare(name, kind, help);
            for t in &targets {
                let (label, value) = (label_value(&t.label), t.numbers[i]);
                text += &format!("{M}{name}{{target=\"{label}\"}} {value}\n");
            }
        }
        let (sum, count) = (self.num("upload_seconds_sum"), self.num("upload_batches"));
        let help = "Time spent in successful upload calls.";
        text + &declare("upload_duration_seconds", "summary", help)
            + &format!("{M}upload_duration_seconds_sum {sum:.6}\n{M}upload_duration_seconds_count {count}\n")
    }
}

/// The prefix of every metric's name.
const M: &str = "nix_post_build_hook_queue_";

/// A metric's `# HELP` and `# TYPE` lines.
fn declare(name: &str, kind: &str, help: &str) -> String {
    format!("# HELP {M}{name} {help}\n# TYPE {M}{name} {kind}\n")
}

/// Paths uploaded per minute over the last [`RATE_WINDOW`] (or since start,
/// when that is shorter).
fn upload_rate(stats: &Stats, started: Instant) -> f64 {
    let window = RATE_WINDOW.min(started.elapsed());
    let recent = stats
        .recent_uploads
        .iter()
        .filter(|(t, _)| t.elapsed() <= window);
    recent.map(|(_, n)| n).sum::<u64>() as f64 * 60.0 / window.as_secs_f64().max(1.0)
}

/// The line saying how many of `total` paths a list left out, if any: `...
/// and 3 more failed (status lists the 100 oldest)`.
fn more(total: usize, listed: usize, what: &str, which: &str) -> String {
    let shown = listed.min(LISTED);
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
fn human_duration(seconds: f64) -> String {
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
fn json_string(s: &str) -> String {
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

/// `text` as a Prometheus label value (between the quotes).
fn label_value(text: &str) -> String {
    let text = text.replace('\\', "\\\\").replace('"', "\\\"");
    text.replace('\n', "\\n")
}

/// Writes `text` to `path` atomically (a reader such as node-exporter's
/// textfile collector never sees half a file): a temporary file, unique
/// per call as two threads may write at once, ending in `.tmp`, which the
/// collector ignores, renamed over the old one. Mode 0644 whatever the
/// umask: the file holds counters only, and node-exporter reads it as
/// another user.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new();
    let file = file.write(true).create_new(true).mode(0o644).open(&tmp);
    let result = file
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, text.as_bytes())?;
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
                ..Backoff::default()
            };
            s.targets[0].backoff.insert(path("a"), b);
            // Being retried by the worker.
            let b = Backoff {
                attempts: 1,
                next_try: None,
                last_error: "x".into(),
                ..Backoff::default()
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
        let fields = [
            ("version", json_string(crate::VERSION)),
            ("uptime_seconds", "3725".into()),
            ("queued", "3".into()),
            ("in_flight", "1".into()),
            ("uploaded", "7".into()),
            ("dropped", "0".into()),
            ("failed_calls", "2".into()),
            ("backing_off", "3".into()),
            ("failed", "1".into()),
            ("oldest_queued_seconds", "75".into()),
            ("upload_seconds_sum", "0.250".into()),
            ("upload_batches", "4".into()),
            ("upload_rate_per_minute", "12.5".into()),
            ("spool_files", "2".into()),
            ("spool_paths", "7".into()),
            ("signing", "false".into()),
            ("target", "null".into()),
            (METRIC_ONLY, "1".into()),
        ];
        Snapshot {
            fields: fields.into(),
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
        s.fields[9].1 = "null".into();
        s.fields[16].1 = json_string("file:///a");
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
        snap.fields[3].1 = "0".into();
        snap.fields[9].1 = "9".into();
        snap.targets = ["file:///a", "upload-command: x \"y\""]
            .iter()
            .map(|label| TargetSnapshot {
                id: TargetId::of(Some(label)),
                label: label.to_string(),
                // queued, delivered, backing off, failed, given up, failed calls, up
                numbers: [2, 3, 1, 0, 0, 4, 1],
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
