//! What the daemon knows about its own progress besides the journal, and
//! one table of fields that renders it as `status` text, `status json` and
//! Prometheus metrics.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::journal::{Journal, TargetId};
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

/// The daemon's fields: `KEY KIND METRIC HELP`. KEY names it in `status
/// json` and `status` (`-`: a metric only); METRIC `-`: not a metric.
const FIELDS: &str = "\
version text - -
uptime_seconds seconds - -
queued gauge queued Paths journaled and not yet uploaded.
in_flight gauge in_flight Paths in the calls in progress.
uploaded counter uploaded_total Paths signed and uploaded to every target since the daemon started.
dropped counter dropped_total Paths given up on since the daemon started.
failed_calls counter failed_calls_total Failed nix calls since the daemon started.
backing_off gauge backing_off Paths waiting to be retried after a failure.
failed gauge failed Paths given up on after repeated failures, kept until requeued or dropped.
oldest_queued_seconds seconds oldest_queued_age_seconds Age of the oldest queued path (0 when the queue is empty).
upload_seconds_sum seconds - -
upload_batches counter - -
upload_rate_per_minute rate - -
spool_files gauge spool_files Request files the hook left in the spool, not yet queued.
spool_paths gauge spool_paths Paths in those spool files.
signing flag - -
target text - -
- counter given_up_total Paths given up on after repeated failures since the daemon started.";

/// Each target's fields, as [`FIELDS`]; its metrics are labelled with it.
const TARGET_FIELDS: &str = "\
target text - -
id text - -
state text - -
queued gauge target_queued Queued paths this target does not have yet (those given up on aside).
delivered counter target_delivered_total Paths this target took since the daemon started.
backing_off gauge target_backing_off Paths waiting to be retried on this target after a failure.
failed gauge target_failed Paths given up on for this target, kept until requeued or dropped.
given_up_total counter target_given_up_total Paths given up on for this target since the daemon started.
failed_calls counter target_failed_calls_total Failed calls to this target since the daemon started.
- gauge target_up 1 when the last call to this target went through (or none was made), 0 when it failed.
last_error text - -";

/// The values of a table's fields, in its order (`None`: unknown).
type Row = Vec<Option<String>>;

/// A listed path: attempts, seconds (to the next try, or since it was
/// given up on) and the last error.
type Item = (StorePath, u32, f64, String);

/// One consistent look at the daemon, for `status` and the metrics file.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The values of [`FIELDS`].
    fields: Row,
    /// The values of [`TARGET_FIELDS`] for each target shown.
    targets: Vec<Row>,
    /// The paths of the calls in progress (and of the batch being prepared).
    in_flight: Vec<StorePath>,
    /// Backing-off paths, soonest first, one per path and target.
    backoff: Vec<Item>,
    /// Paths given up on for a target now, oldest first.
    failed: Vec<Item>,
}

/// The fields of `table` with their values: `[KEY, KIND, METRIC, HELP]`.
fn fields<'a>(
    table: &'static str,
    row: &'a [Option<String>],
) -> Vec<([&'static str; 4], Option<&'a str>)> {
    let split = |line| {
        let mut words = str::splitn(line, 4, ' ');
        [(); 4].map(|()| words.next().unwrap_or(""))
    };
    let values = row.iter().map(Option::as_deref);
    table.lines().map(split).zip(values).collect()
}

impl Snapshot {
    /// Takes a snapshot of the journal and the statistics, secrets masked.
    pub fn take(journal: &Journal, shared: &Shared, spool_dir: &Path, signing: bool) -> Snapshot {
        let now = SystemTime::now().duration_since(UNIX_EPOCH);
        let now = now.map_or(0, |d| d.as_secs());
        let oldest = journal.oldest();
        let oldest = oldest.map(|e| now.saturating_sub(e.queued_at).to_string());
        let (spool_files, spool_paths) = crate::spool::backlog(spool_dir);
        let stats = shared.lock();
        // Errors quote nix, which may repeat a target with its password.
        let tagged = |label: &str, error: &str| match stats.targets.len() {
            1 => redact::text(error),
            _ => redact::text(&format!("{label}: {error}")),
        };
        let n = |n: u64| Some(n.to_string());
        let sum = |f: fn(&TargetStats) -> u64| stats.targets.iter().map(f).sum::<u64>();
        let (mut failed, mut backoff, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        let mut in_flight = stats.in_flight_paths.clone();
        for t in &stats.targets {
            let gave_up = journal.given_up_up_to(u64::MAX, t.id);
            let gave_up_now = gave_up.len() as u64;
            for (p, g) in gave_up {
                let ago = now.saturating_sub(g.at) as f64;
                failed.push((p, g.attempts, ago, tagged(&t.label, &g.error)));
            }
            let before = backoff.len();
            for (p, b) in t.backoff.iter().filter(|(_, b)| b.attempts > 0) {
                let next = b
                    .next_try
                    .map(|t| t.saturating_duration_since(Instant::now()));
                let next = (next.map_or(0.0, |d| d.as_secs_f64()) * 10.0).round() / 10.0;
                backoff.push((p.clone(), b.attempts, next, tagged(&t.label, &b.last_error)));
            }
            in_flight.extend(t.in_flight.iter().cloned());
            let state = t.last_error.as_ref().map_or("ok", |_| "failing");
            targets.extend((t.label != "-").then(|| {
                vec![
                    Some(t.label.clone()),
                    Some(t.id.to_string()),
                    Some(state.to_string()),
                    n(journal.count_waiting_up_to(u64::MAX, &[t.id]) as u64),
                    n(t.delivered),
                    n((backoff.len() - before) as u64),
                    n(gave_up_now),
                    n(t.given_up),
                    n(t.failed_calls),
                    n(u64::from(t.last_error.is_none())),
                    t.last_error.as_deref().map(redact::text),
                ]
            }));
        }
        let mut seen = HashSet::new();
        in_flight.retain(|p| seen.insert(p.clone()));
        backoff.sort_by(|a, b| a.2.total_cmp(&b.2));
        // Paths per minute over the last RATE_WINDOW, or since start if shorter.
        let window = RATE_WINDOW.min(shared.started.elapsed());
        let recent = stats
            .recent_uploads
            .iter()
            .filter(|(t, _)| t.elapsed() <= window);
        let rate =
            recent.map(|(_, n)| n).sum::<u64>() as f64 * 60.0 / window.as_secs_f64().max(1.0);
        let labels: Vec<&str> = targets.iter().filter_map(|t| t[0].as_deref()).collect();
        let fields = vec![
            Some(crate::VERSION.to_string()),
            n(shared.started.elapsed().as_secs()),
            n(journal.len() as u64),
            n(in_flight.len() as u64),
            n(stats.uploaded),
            n(stats.dropped),
            n(stats.failed_calls + sum(|t| t.failed_calls)),
            n(stats.backing_off() as u64),
            n(failed.len() as u64),
            oldest,
            Some(format!("{:.3}", stats.upload_seconds)),
            n(stats.upload_batches),
            Some(format!("{rate:.1}")),
            n(spool_files as u64),
            n(spool_paths as u64),
            Some(signing.to_string()),
            Some(labels.join(", ")).filter(|l| !l.is_empty()),
            n(sum(|t| t.given_up)),
        ];
        Snapshot {
            fields,
            targets,
            in_flight,
            backoff,
            failed,
        }
    }

    /// `status` for people: `label: value` per field, with what it lists.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for ([key, kind, ..], v) in fields(FIELDS, &self.fields) {
            if key != "-" {
                s += &format!("{:<13} {}\n", format!("{}:", label(key)), human(kind, v));
            }
            s += &match key {
                "in_flight" => {
                    let paths = self.in_flight.iter().map(|p| format!("uploading {p}"));
                    listed(paths, self.in_flight.len(), TEXT_IN_FLIGHT)
                }
                "backing_off" => {
                    listed(self.backoff.iter().map(backoff), number(v) as usize, LISTED)
                }
                "failed" => listed(self.failed.iter().map(given_up), self.failed.len(), LISTED),
                "target" => listed(
                    self.targets.iter().map(|t| target(t)),
                    self.targets.len(),
                    LISTED,
                ),
                _ => String::new(),
            };
        }
        s
    }

    /// `status json`: one JSON object on one line.
    pub fn json(&self) -> String {
        let items = |items: &[Item], seconds: &str| {
            let items = items.iter().take(LISTED).map(|(p, attempts, s, e)| {
                let (p, e) = (json_string(p.as_str()), json_string(&one_line(e)));
                format!(
                    "{{\"path\":{p},\"attempts\":{attempts},\"{seconds}\":{s},\"last_error\":{e}}}"
                )
            });
            items.collect::<Vec<_>>().join(",")
        };
        let in_flight = self
            .in_flight
            .iter()
            .take(LISTED)
            .map(|p| json_string(p.as_str()));
        let targets = self.targets.iter().map(|t| object(TARGET_FIELDS, t, ""));
        let lists = format!(
            ",\"backoff\":[{}],\"failed_paths\":[{}],\"in_flight_paths\":[{}],\"targets\":[{}]",
            items(&self.backoff, "next_try_seconds"),
            items(&self.failed, "given_up_seconds_ago"),
            in_flight.collect::<Vec<_>>().join(","),
            targets.collect::<Vec<_>>().join(",")
        );
        object(FIELDS, &self.fields, &lists) + "\n"
    }

    /// The Prometheus text exposition of the snapshot.
    pub fn prometheus(&self) -> String {
        let mut text = String::new();
        for ([_, kind, name, help], v) in fields(FIELDS, &self.fields) {
            if name != "-" {
                text += &(declare(name, kind, help) + &format!("{M}{name} {}\n", number(v)));
            }
        }
        let by_target = self.targets.iter().map(|t| fields(TARGET_FIELDS, t));
        let by_target: Vec<_> = by_target.collect();
        for (i, &([_, kind, name, help], _)) in by_target.first().into_iter().flatten().enumerate()
        {
            if name == "-" {
                continue;
            }
            text += &declare(name, kind, help);
            for t in &by_target {
                let label = label_value(t[0].1.unwrap_or(""));
                text += &format!("{M}{name}{{target=\"{label}\"}} {}\n", number(t[i].1));
            }
        }
        let [sum, count] = [10, 11].map(|i| number(self.fields[i].as_deref()));
        let help = "Time spent in successful upload calls.";
        text + &declare("upload_duration_seconds", "summary", help)
            + &format!(
                "{M}upload_duration_seconds_sum {sum}\n{M}upload_duration_seconds_count {count}\n"
            )
    }
}

/// A field's key as `status` names it: `oldest_queued_seconds` is `oldest queued`.
fn label(key: &str) -> String {
    let key = key.strip_suffix("_per_minute").unwrap_or(key);
    key.trim_end_matches("_seconds").replace('_', " ")
}

/// A value as `status` shows it to people, by its kind.
fn human(kind: &str, value: Option<&str>) -> String {
    let Some(v) = value else {
        return "none".to_string();
    };
    match kind {
        "counter" => format!("{v} since start"),
        "seconds" => human_duration(number(value)),
        "rate" => format!("{v} paths/min lately"),
        "flag" => (if v == "true" { "on" } else { "off" }).to_string(),
        _ => one_line(v),
    }
}

/// A value as a number (0 when unknown).
fn number(value: Option<&str>) -> f64 {
    value.and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// The fields of a table that `status json` shows, as one JSON object
/// ending with `more`.
fn object(table: &'static str, row: &[Option<String>], more: &str) -> String {
    let shown = fields(table, row).into_iter().filter(|(f, _)| f[0] != "-");
    let pairs = shown.map(|([key, kind, ..], v)| match (kind, v) {
        (_, None) => format!("\"{key}\":null"),
        ("text", Some(v)) => format!("\"{key}\":{}", json_string(&one_line(v))),
        (_, Some(v)) => format!("\"{key}\":{v}"),
    });
    format!("{{{}{more}}}", pairs.collect::<Vec<_>>().join(","))
}

/// A target's line in `status`: its label, then its fields.
fn target(row: &[Option<String>]) -> String {
    let all = fields(TARGET_FIELDS, row).into_iter().skip(1);
    let shown = all.filter(|(f, _)| f[0] != "-");
    let shown = shown.filter_map(|([key, kind, ..], v)| Some((key, kind, v?)));
    let shown = shown.map(|(key, kind, v)| format!("{} {}", label(key), human(kind, Some(v))));
    let label = row[0].as_deref().unwrap_or("");
    format!("{label}: {}", shown.collect::<Vec<_>>().join(", "))
}

/// A backing-off path's line in `status`.
fn backoff((path, attempts, next, error): &Item) -> String {
    let when = match *next > 0.0 {
        true => format!("next try in {}", human_duration(*next)),
        false => "retrying now".to_string(),
    };
    format!("{path}: attempt {attempts} failed, {when}: {error}")
}

/// A given-up-on path's line in `status`.
fn given_up((path, attempts, ago, error): &Item) -> String {
    let ago = human_duration(*ago);
    format!("{path}: FAILED, given up on {ago} ago after {attempts} attempts: {error}")
}

/// Indented lines, at most `cap` of them, then how many of `total` it left out.
fn listed(lines: impl Iterator<Item = String>, total: usize, cap: usize) -> String {
    let lines: Vec<String> = lines.take(cap).collect();
    let mut s: String = lines
        .iter()
        .map(|l| format!("  {}\n", one_line(l)))
        .collect();
    if total > lines.len() {
        s += &format!("  ... and {} more\n", total - lines.len());
    }
    s
}

/// The prefix of every metric's name.
const M: &str = "nix_post_build_hook_queue_";

/// A metric's `# HELP` and `# TYPE` lines; every KIND but `counter` and
/// `summary` is a gauge.
fn declare(name: &str, kind: &str, help: &str) -> String {
    let kind = if matches!(kind, "counter" | "summary") {
        kind
    } else {
        "gauge"
    };
    format!("# HELP {M}{name} {help}\n# TYPE {M}{name} {kind}\n")
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

/// Writes `text` to `path` atomically, through a `.tmp` file (unique per
/// call: two threads may write at once) that node-exporter ignores. Mode
/// 0644 whatever the umask: counters only, read by another user.
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
        assert_eq!(snap.fields[2].as_deref(), Some("2"));
        assert_eq!(snap.backoff[0].2, 0.0, "being retried: due now");
        assert_eq!(snap.backoff[0].0, path("b"));
        assert!((50.0..=60.0).contains(&snap.backoff[1].2));
        let text = snap.text();
        assert!(text.contains("\nqueued:       2\n"), "{text}");
        assert!(text.contains("\noldest queued: 0s\n"), "{text}");
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
            crate::VERSION,
            "3725",
            "3",
            "1",
            "7",
            "0",
            "2",
            "3",
            "1",
            "75",
            "0.250",
            "4",
            "12.5",
            "2",
            "7",
            "false",
            "-",
            "1",
        ];
        let mut fields: Row = fields.iter().map(|v| Some(v.to_string())).collect();
        fields[16] = None;
        assert_eq!(fields.len(), FIELDS.lines().count());
        Snapshot {
            fields,
            targets: Vec::new(),
            in_flight: vec![path("d")],
            backoff: vec![
                (path("a"), 1, 0.0, "a \"quoted\" \\ path\tand\u{1}".into()),
                (path("b"), 2, 125.3, "boom".into()),
            ],
            failed: vec![(path("c"), 10, 65.0, "boom".into())],
        }
    }

    #[test]
    fn text_shows_durations_and_backoff() {
        let [a, b, c, d] = ["a", "b", "c", "d"].map(path);
        assert_eq!(
            snapshot().text(),
            format!(
                "version:      {}\n\
                 uptime:       1h 2m\n\
                 queued:       3\n\
                 in flight:    1\n\
                 \x20 uploading {d}\n\
                 uploaded:     7 since start\n\
                 dropped:      0 since start\n\
                 failed calls: 2 since start\n\
                 backing off:  3\n\
                 \x20 {a}: attempt 1 failed, retrying now: a \"quoted\" \\ path\tand\u{1}\n\
                 \x20 {b}: attempt 2 failed, next try in 2m 5s: boom\n\
                 \x20 ... and 1 more\n\
                 failed:       1\n\
                 \x20 {c}: FAILED, given up on 1m 5s ago after 10 attempts: boom\n\
                 oldest queued: 1m 15s\n\
                 upload seconds sum: 0.2s\n\
                 upload batches: 4 since start\n\
                 upload rate:  12.5 paths/min lately\n\
                 spool files:  2\n\
                 spool paths:  7\n\
                 signing:      off\n\
                 target:       none\n",
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
                 \"backoff\":[{{\"path\":\"{a}\",\"attempts\":1,\"next_try_seconds\":0,\
                 \"last_error\":\"a \\\"quoted\\\" \\\\ path\\u0009and\\u0001\"}},\
                 {{\"path\":\"{b}\",\"attempts\":2,\"next_try_seconds\":125.3,\"last_error\":\"boom\"}}],\
                 \"failed_paths\":[{{\"path\":\"{c}\",\"attempts\":10,\
                 \"given_up_seconds_ago\":65,\"last_error\":\"boom\"}}],\
                 \"in_flight_paths\":[\"{d}\"],\"targets\":[]}}\n",
                crate::VERSION
            )
        );
        let mut s = snapshot();
        s.fields[9] = None;
        s.fields[16] = Some("file:///a".into());
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
        snap.fields[3] = Some("0".into());
        snap.fields[9] = Some("9".into());
        snap.targets = ["file:///a", "upload-command: x \"y\""]
            .iter()
            .map(|label| {
                let id = TargetId::of(Some(label)).to_string();
                let row = [*label, id.as_str(), "ok", "2", "3", "1", "0", "0", "4", "1"];
                let mut row: Row = row.iter().map(|v| Some(v.to_string())).collect();
                row.push(None);
                row
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
