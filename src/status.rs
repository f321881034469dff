//! The daemon's progress besides the journal, and one table of fields that
//! renders it as `status` text, `status json` and Prometheus metrics.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

/// A path its target's lane still needs (not tried yet, or backing off): failed attempts since
/// start, those blamed on it, its next try (`None` while tried), last error, signed by the front.
#[derive(Debug, Clone, Default)]
#[allow(missing_docs)]
pub struct Backoff {
    pub attempts: u32,
    pub failures: Failures,
    pub next_try: Option<Instant>,
    pub last_error: String,
    pub signed: bool,
}

/// One target's state since the daemon started: its journal name, its label
/// (secrets masked), the paths its lane still needs and those of its call in
/// progress, paths it took and given up on for it, its failed calls, and the
/// error of its last call if that call failed.
#[derive(Default)]
#[allow(missing_docs)]
pub struct TargetStats {
    pub id: TargetId,
    pub label: String,
    pub backoff: HashMap<StorePath, Backoff>,
    pub in_flight: Vec<StorePath>,
    pub delivered: u64,
    pub given_up: u64,
    pub failed_calls: u64,
    pub last_error: Option<String>,
}

/// Counters and state since the daemon started: paths uploaded (every target has them,
/// or they were only signed) and dropped (gone from the store, or by an operator), failed
/// nix calls outside the targets' (signing), the batch being prepared, the time spent in
/// successful upload calls and their number, the targets in the configuration's order.
#[derive(Default)]
#[allow(missing_docs)]
pub struct Stats {
    pub uploaded: u64,
    pub dropped: u64,
    pub failed_calls: u64,
    pub in_flight_paths: Vec<StorePath>,
    /// Paths finished in the last [`RATE_WINDOW`], with when.
    recent_uploads: VecDeque<(Instant, u64)>,
    pub upload_seconds: f64,
    pub upload_batches: u64,
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
    /// Process groups of the running nix calls (0: none), front then targets.
    running: Vec<Arc<AtomicU32>>,
}

impl Shared {
    /// Fresh statistics for these targets, starting now.
    pub fn new(targets: &[Target]) -> Shared {
        let target = |t: &Target| TargetStats {
            id: t.id,
            label: t.label.clone(),
            ..TargetStats::default()
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

/// The daemon's fields: `KEY KIND METRIC HELP`; KEY or METRIC `-`: not in status, not a metric.
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

/// A listed path, attempts, seconds (to the next try, or since given up), error.
type Item = (StorePath, u32, f64, String);

/// One look at the daemon: its fields, each shown target's, and the paths listed.
pub struct Snapshot {
    fields: Row,
    targets: Vec<Row>,
    in_flight: Vec<StorePath>,
    backoff: Vec<Item>,
    failed: Vec<Item>,
}

/// A field of a table, `[KEY, KIND, METRIC, HELP]`, with its value.
type Field<'a> = ([&'static str; 4], Option<&'a str>);

/// The fields of `table` with the values of `row`.
fn fields<'a>(table: &'static str, row: &'a [Option<String>]) -> impl Iterator<Item = Field<'a>> {
    let split = |line: &'static str| {
        let mut words = line.splitn(4, ' ');
        [(); 4].map(|()| words.next().unwrap_or(""))
    };
    let values = row.iter().map(Option::as_deref);
    table.lines().map(split).zip(values)
}

impl Snapshot {
    /// Takes a snapshot of the journal and the statistics, secrets masked.
    pub fn take(journal: &Journal, shared: &Shared, spool_dir: &Path, signing: bool) -> Snapshot {
        let (at, now) = (Instant::now(), crate::journal::now_secs());
        let s = |v: &dyn ToString| Some(v.to_string());
        let (spool_files, spool_paths) = crate::spool::backlog(spool_dir);
        let oldest = journal.oldest().map(|e| now.saturating_sub(e.queued_at));
        let stats = shared.lock();
        let (mut failed, mut backoff, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        let mut in_flight = stats.in_flight_paths.clone();
        for t in &stats.targets {
            // Errors quote nix, which may repeat a target with its password.
            let tagged = |error: &str| match stats.targets.len() {
                1 => redact::text(error),
                _ => redact::text(&format!("{}: {error}", t.label)),
            };
            let (backing_off, failing) = (backoff.len(), failed.len());
            for (p, g) in journal.given_up_up_to(u64::MAX, t.id) {
                let ago = now.saturating_sub(g.at) as f64;
                failed.push((p, g.attempts, ago, tagged(&g.error)));
            }
            for (p, b) in t.backoff.iter().filter(|(_, b)| b.attempts > 0) {
                let next = b.next_try.map(|t| t.saturating_duration_since(at));
                let next = (next.map_or(0.0, |d| d.as_secs_f64()) * 10.0).round() / 10.0;
                backoff.push((p.clone(), b.attempts, next, tagged(&b.last_error)));
            }
            in_flight.extend(t.in_flight.iter().cloned());
            let row = vec![
                s(&t.label),
                s(&t.id),
                s(&t.last_error.as_ref().map_or("ok", |_| "failing")),
                s(&journal.count_waiting_up_to(u64::MAX, &[t.id])),
                s(&t.delivered),
                s(&(backoff.len() - backing_off)),
                s(&(failed.len() - failing)),
                s(&t.given_up),
                s(&t.failed_calls),
                s(&u8::from(t.last_error.is_none())),
                t.last_error.as_deref().map(redact::text),
            ];
            targets.extend((t.label != "-").then_some(row));
        }
        let mut seen = HashSet::new();
        in_flight.retain(|p| seen.insert(p.clone()));
        backoff.sort_by(|a, b| a.2.total_cmp(&b.2));
        // Paths per minute over the last RATE_WINDOW, or since start if shorter.
        let window = RATE_WINDOW.min(shared.started.elapsed());
        let fresh = |(t, n): &(Instant, u64)| (t.elapsed() <= window).then_some(*n);
        let recent: u64 = stats.recent_uploads.iter().filter_map(fresh).sum();
        let rate = recent as f64 * 60.0 / window.as_secs_f64().max(1.0);
        let labels: Vec<_> = targets.iter().flat_map(|t: &Row| t[0].as_deref()).collect();
        let sum = |f: fn(&TargetStats) -> u64| stats.targets.iter().map(f).sum::<u64>();
        Snapshot {
            fields: vec![
                s(&crate::VERSION),
                s(&shared.started.elapsed().as_secs()),
                s(&journal.len()),
                s(&in_flight.len()),
                s(&stats.uploaded),
                s(&stats.dropped),
                s(&(stats.failed_calls + sum(|t| t.failed_calls))),
                s(&stats.backing_off()),
                s(&failed.len()),
                oldest.map(|o| o.to_string()),
                s(&format!("{:.3}", stats.upload_seconds)),
                s(&stats.upload_batches),
                s(&format!("{rate:.1}")),
                s(&spool_files),
                s(&spool_paths),
                s(&signing),
                Some(labels.join(", ")).filter(|l| !l.is_empty()),
                s(&sum(|t| t.given_up)),
            ],
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
            let total = number(v) as usize;
            let uploading = |p: &StorePath| format!("uploading {p}");
            s += &match key {
                "in_flight" => listed(&self.in_flight, TEXT_IN_FLIGHT, total, uploading),
                "backing_off" => listed(&self.backoff, LISTED, total, |(p, a, next, e)| {
                    let when = format!("next try in {}", human_duration(*next));
                    let when = if *next > 0.0 { &when } else { "retrying now" };
                    format!("{p}: attempt {a} failed, {when}: {e}")
                }),
                "failed" => listed(&self.failed, LISTED, total, |(p, a, ago, e)| {
                    let ago = human_duration(*ago);
                    format!("{p}: FAILED, given up on {ago} ago after {a} attempts: {e}")
                }),
                "target" => listed(&self.targets, LISTED, total, |t| target(t)),
                _ => String::new(),
            };
        }
        s
    }

    /// `status json`: one JSON object on one line.
    pub fn json(&self) -> String {
        let item = |key: &'static str| {
            move |(p, a, s, e): &Item| {
                let (p, e) = (json_string(p.as_str()), json_string(e));
                format!(r#"{{"path":{p},"attempts":{a},"{key}":{s},"last_error":{e}}}"#)
            }
        };
        let lists = format!(
            r#","backoff":[{}],"failed_paths":[{}],"in_flight_paths":[{}],"targets":[{}]"#,
            capped(&self.backoff, item("next_try_seconds")),
            capped(&self.failed, item("given_up_seconds_ago")),
            capped(&self.in_flight, |p| json_string(p.as_str())),
            capped(&self.targets, |t| object(TARGET_FIELDS, t, "")),
        );
        object(FIELDS, &self.fields, &lists) + "\n"
    }

    /// The Prometheus text exposition of the snapshot.
    pub fn prometheus(&self) -> String {
        let targets = self.targets.iter().map(|t| {
            let label = t[0].as_deref().unwrap_or("").replace('\\', "\\\\");
            let label = label.replace('"', "\\\"").replace('\n', "\\n");
            (format!("{{target=\"{label}\"}}"), t)
        });
        let targets: Vec<_> = targets.collect();
        let text =
            metrics(FIELDS, &[(String::new(), &self.fields)]) + &metrics(TARGET_FIELDS, &targets);
        let [sum, count] = [10, 11].map(|i| number(self.fields[i].as_deref()));
        let d = format!("{M}upload_duration_seconds");
        text + &format!(
            "# HELP {d} Time spent in successful upload calls.\n# TYPE {d} summary\n\
             {d}_sum {sum}\n{d}_count {count}\n"
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
    match (kind, value) {
        (_, None) => "none".to_string(),
        ("counter", Some(v)) => format!("{v} since start"),
        ("seconds", _) => human_duration(number(value)),
        ("rate", Some(v)) => format!("{v} paths/min lately"),
        ("flag", Some(v)) => (if v == "true" { "on" } else { "off" }).to_string(),
        (_, Some(v)) => one_line(v),
    }
}

/// A value as a number (0 when unknown).
fn number(value: Option<&str>) -> f64 {
    value.and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// The fields of a table that `status json` shows, as one JSON object ending with `more`.
fn object(table: &'static str, row: &[Option<String>], more: &str) -> String {
    let shown = fields(table, row).filter(|(f, _)| f[0] != "-");
    let pairs = shown.map(|([key, kind, ..], v)| match (kind, v) {
        (_, None) => format!("\"{key}\":null"),
        ("text", Some(v)) => format!("\"{key}\":{}", json_string(v)),
        (_, Some(v)) => format!("\"{key}\":{v}"),
    });
    format!("{{{}{more}}}", pairs.collect::<Vec<_>>().join(","))
}

/// At most [`LISTED`] of `items` for `status json`, comma-separated.
fn capped<T>(items: &[T], item: impl Fn(&T) -> String) -> String {
    let items: Vec<_> = items.iter().take(LISTED).map(item).collect();
    items.join(",")
}

/// A target's line in `status`: its label, then its fields.
fn target(row: &[Option<String>]) -> String {
    let shown = fields(TARGET_FIELDS, row).skip(1);
    let shown = shown.filter_map(|([key, kind, ..], v)| match key {
        "-" => None,
        _ => Some(format!("{} {}", label(key), human(kind, Some(v?)))),
    });
    let label = row[0].as_deref().unwrap_or("");
    format!("{label}: {}", shown.collect::<Vec<_>>().join(", "))
}

/// `items` as indented lines, at most `cap`, then how many of `total` it left out.
fn listed<T>(items: &[T], cap: usize, total: usize, line: impl Fn(&T) -> String) -> String {
    let shown = &items[..items.len().min(cap)];
    let lines = shown.iter().map(|i| format!("  {}\n", one_line(&line(i))));
    let left = total.max(items.len()) - shown.len();
    let more = (left > 0).then(|| format!("  ... and {left} more\n"));
    lines.chain(more).collect()
}

const M: &str = "nix_post_build_hook_queue_";

/// The metrics of a table (every KIND but `counter` is a gauge), sampled for every row.
fn metrics(table: &'static str, rows: &[(String, &Row)]) -> String {
    let mut text = String::new();
    let first = rows.first().map(|(_, r)| &r[..]).unwrap_or_default();
    for (i, ([_, kind, name, help], _)) in fields(table, first).enumerate() {
        if name != "-" {
            let kind = if kind == "counter" { kind } else { "gauge" };
            text += &format!("# HELP {M}{name} {help}\n# TYPE {M}{name} {kind}\n");
            for (labels, row) in rows {
                text += &format!("{M}{name}{labels} {}\n", number(row[i].as_deref()));
            }
        }
    }
    text
}

/// A duration for people: `0.4s` (fractions under 10s), `42s`, `5m 3s`, `1h 3m`, `2d 5h`.
fn human_duration(seconds: f64) -> String {
    if (0.0..10.0).contains(&seconds) && seconds.fract() != 0.0 {
        return format!("{seconds:.1}s");
    }
    match seconds.round() as u64 {
        _ if !seconds.is_finite() => "0s".to_string(),
        s @ 0..=59 => format!("{s}s"),
        s @ 60..=3599 => format!("{}m {}s", s / 60, s % 60),
        s @ 3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `text` on one line as a JSON string literal.
fn json_string(text: &str) -> String {
    let escape = |c: char| match c {
        '"' | '\\' => format!("\\{c}"),
        c if c.is_control() => format!("\\u{:04x}", c as u32),
        c => c.to_string(),
    };
    let text: String = one_line(text).chars().map(escape).collect();
    format!("\"{text}\"")
}

/// Writes `text` to `path` through a unique `.tmp` file (two threads may write at once), mode 0644.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    let write = || {
        let mut file = std::fs::OpenOptions::new();
        let mut file = file.write(true).create_new(true).mode(0o644).open(&tmp)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&tmp, path)
    };
    write().inspect_err(|_| drop(std::fs::remove_file(&tmp)))
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
