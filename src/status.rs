//! What the daemon knows about its own progress, shared by the worker (which
//! updates it) and the connection threads (which report it).
//!
//! The queue itself lives in the journal; this holds the counters since start
//! and, per target, the paths that are backing off after failures.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::journal::{GivenUp, Journal, TargetId};
use crate::target::Target;

use crate::store_path::StorePath;

/// The upload rate is measured over this much of the recent past.
pub const RATE_WINDOW: Duration = Duration::from_secs(300);

/// A path whose last attempt failed.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Failed attempts so far (since the daemon started).
    pub attempts: u32,
    /// Those of the attempts that count towards `max-attempts`: the ones
    /// that failed while the target answered.
    pub counted: u32,
    /// When it is tried again; `None` while it is being retried (back in
    /// the worker's queue or in flight), until it succeeds or fails again.
    pub next_try: Option<Instant>,
    /// What went wrong the last time, on one line.
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
    /// Paths this target took since start.
    pub delivered: u64,
    /// Paths given up on for this target since start.
    pub given_up: u64,
    /// Failed calls to this target since start.
    pub failed_calls: u64,
    /// The error of its last call, if that call failed.
    pub last_error: Option<String>,
}

impl TargetStats {
    fn new(target: &Target) -> TargetStats {
        TargetStats {
            id: target.id,
            label: target.label.clone(),
            backoff: HashMap::new(),
            delivered: 0,
            given_up: 0,
            failed_calls: 0,
            last_error: None,
        }
    }
}

/// Counters and failure state since the daemon started.
#[derive(Debug)]
pub struct Stats {
    /// When the daemon started.
    pub started: Instant,
    /// Paths that finished: signed and uploaded as configured.
    pub uploaded: u64,
    /// Paths given up on (gone from the store, or unreadable derivations).
    pub dropped: u64,
    /// Paths given up on for a target after too many failures (they stay
    /// in the journal), over all targets.
    pub given_up: u64,
    /// nix calls that failed.
    pub failed_calls: u64,
    /// Paths in the batch the worker is working on now.
    pub in_flight: usize,
    /// Those paths, once the batch's derivations are resolved.
    pub in_flight_paths: Vec<StorePath>,
    /// Paths finished in the last [`RATE_WINDOW`], with when, oldest first.
    pub recent_uploads: VecDeque<(Instant, u64)>,
    /// Seconds spent in successful upload batches, and their number.
    pub upload_seconds: f64,
    /// Number of successful upload batches.
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
        match self.targets.as_slice() {
            [one] => one.backoff.len(),
            all => {
                let mut paths: std::collections::HashSet<&StorePath> =
                    std::collections::HashSet::new();
                for t in all {
                    paths.extend(t.backoff.keys());
                }
                paths.len()
            }
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

    /// Paths uploaded per minute over the last [`RATE_WINDOW`] (or since
    /// start, when that is shorter).
    pub fn upload_rate_per_minute(&self) -> f64 {
        let now = Instant::now();
        let window = RATE_WINDOW.min(now.duration_since(self.started));
        let n: u64 = self
            .recent_uploads
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= window)
            .map(|(_, n)| n)
            .sum();
        n as f64 * 60.0 / window.as_secs_f64().max(1.0)
    }
}

/// What the daemon's threads share besides the journal.
pub struct Shared {
    stats: Mutex<Stats>,
    /// Set when the daemon is stopping: no new connections, no new batches.
    pub stopping: AtomicBool,
    /// Process group of the nix call running now (0: none), killed when a
    /// stop outlasts its grace period.
    pub running_pgid: Arc<AtomicU32>,
}

impl Shared {
    /// Fresh statistics for these targets, starting now.
    pub fn new(targets: &[Target]) -> Shared {
        Shared {
            stopping: AtomicBool::new(false),
            running_pgid: Arc::new(AtomicU32::new(0)),
            stats: Mutex::new(Stats {
                started: Instant::now(),
                uploaded: 0,
                dropped: 0,
                given_up: 0,
                failed_calls: 0,
                in_flight: 0,
                in_flight_paths: Vec::new(),
                recent_uploads: VecDeque::new(),
                upload_seconds: 0.0,
                upload_batches: 0,
                targets: targets.iter().map(TargetStats::new).collect(),
            }),
        }
    }

    /// Locks the statistics; a poisoned lock still holds usable counters.
    pub fn lock(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new(&[Target::sign_only()])
    }
}

/// Seconds until `when`, or 0 when it has passed.
pub fn seconds_until(when: Instant) -> f64 {
    when.saturating_duration_since(Instant::now()).as_secs_f64()
}

/// Most backing-off paths listed in a `status` reply.
const STATUS_MAX_BACKOFF: usize = 100;
/// Most paths of the batch in flight listed in a `status` reply.
const STATUS_MAX_IN_FLIGHT: usize = 100;
/// Most paths given up on listed in a `status` reply.
const STATUS_MAX_FAILED: usize = 100;

/// One consistent look at the queue, for `status` and the metrics file.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Seconds since the daemon started.
    pub uptime_seconds: u64,
    /// Paths in the journal.
    pub queued: usize,
    /// Paths in the worker's current batch.
    pub in_flight: usize,
    /// Those paths (once its derivations are resolved).
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
    /// Total seconds of successful upload batches.
    pub upload_seconds: f64,
    /// Number of successful upload batches.
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
    /// Paths given up on for a target now, oldest first, with how long
    /// ago; they stay until requeued or dropped. One per path and target;
    /// with several targets the error starts with the target's label.
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

impl TargetSnapshot {
    /// `ok`, or `failing` when its last call failed.
    pub fn state(&self) -> &'static str {
        if self.last_error.is_some() {
            "failing"
        } else {
            "ok"
        }
    }
}

impl Snapshot {
    /// Takes a snapshot of the journal and the statistics.
    pub fn take(journal: &Journal, shared: &Shared, spool_dir: &Path, signing: bool) -> Snapshot {
        let queued = journal.len();
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
        let several = ids.len() > 1;
        let tagged = |label: &str, error: String| {
            if several {
                format!("{label}: {error}")
            } else {
                error
            }
        };
        let mut failed = Vec::new();
        let mut pending = Vec::new();
        for (id, label) in &ids {
            let given_up = journal.given_up_on(*id);
            pending.push((journal.count_pending(*id), given_up.len()));
            for (p, mut g) in given_up {
                g.error = tagged(label, g.error);
                let ago = now.saturating_sub(g.at);
                failed.push((p, g, ago));
            }
        }
        let (spool_files, spool_paths) = crate::spool::backlog(spool_dir);
        let stats = shared.lock();
        let mut backoff: Vec<(u32, f64, StorePath, String)> = Vec::new();
        for t in &stats.targets {
            backoff.extend(t.backoff.iter().map(|(p, b)| {
                (
                    b.attempts,
                    b.next_try.map_or(0.0, seconds_until),
                    p.clone(),
                    tagged(&t.label, crate::redact::text(&b.last_error)),
                )
            }));
        }
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
                last_error: t.last_error.as_deref().map(crate::redact::text),
            })
            .collect();
        let labels: Vec<&str> = ids
            .iter()
            .map(|(_, l)| l.as_str())
            .filter(|l| *l != "-")
            .collect();
        Snapshot {
            uptime_seconds: stats.started.elapsed().as_secs(),
            queued,
            in_flight: stats.in_flight,
            in_flight_paths: stats.in_flight_paths.clone(),
            spool_files,
            spool_paths,
            upload_rate_per_minute: stats.upload_rate_per_minute(),
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
            targets,
        }
    }

    /// The informational lines of the `status` reply: `key value`, then one
    /// `backoff ATTEMPTS NEXT-TRY-SECONDS PATH ERROR` line per failing path,
    /// one `target-state ID QUEUED DELIVERED BACKING-OFF FAILED
    /// GIVEN-UP-TOTAL FAILED-CALLS STATE LABEL` line per target (with a
    /// `target-error ID ERROR` line when its last call failed), and the
    /// paths in flight and given up on.
    pub fn reply_lines(&self) -> String {
        let mut out = String::new();
        let mut kv = |k: &str, v: &dyn std::fmt::Display| out.push_str(&format!("{k} {v}\n"));
        kv("version", &crate::VERSION);
        kv("uptime-seconds", &self.uptime_seconds);
        kv("queued", &self.queued);
        kv("in-flight", &self.in_flight);
        kv("uploaded", &self.uploaded);
        kv("dropped", &self.dropped);
        kv("failed-calls", &self.failed_calls);
        kv("backing-off", &self.backing_off);
        kv("failed", &self.failed.len());
        match self.oldest_queued_seconds {
            Some(s) => kv("oldest-queued-seconds", &s),
            None => kv("oldest-queued-seconds", &"-"),
        }
        kv("upload-seconds-sum", &format!("{:.3}", self.upload_seconds));
        kv("upload-batches", &self.upload_batches);
        kv(
            "upload-rate-per-minute",
            &format!("{:.1}", self.upload_rate_per_minute),
        );
        kv("spool-files", &self.spool_files);
        kv("spool-paths", &self.spool_paths);
        kv("signing", &self.signing);
        kv("target", &self.target.as_deref().unwrap_or("-"));
        for (attempts, next, path, error) in self.backoff.iter().take(STATUS_MAX_BACKOFF) {
            out.push_str(&format!(
                "backoff {attempts} {next:.1} {path} {}\n",
                crate::protocol::one_line(error)
            ));
        }
        for path in self.in_flight_paths.iter().take(STATUS_MAX_IN_FLIGHT) {
            out.push_str(&format!("in-flight-path {path}\n"));
        }
        for (path, g, ago) in self.failed.iter().take(STATUS_MAX_FAILED) {
            out.push_str(&format!(
                "failed-path {} {ago} {path} {}\n",
                g.attempts,
                crate::protocol::one_line(&crate::redact::text(&g.error))
            ));
        }
        for t in self.targets.iter().filter(|t| t.label != "-") {
            out.push_str(&format!(
                "target-state {} {} {} {} {} {} {} {} {}\n",
                t.id,
                t.queued,
                t.delivered,
                t.backing_off,
                t.failed,
                t.given_up_total,
                t.failed_calls,
                t.state(),
                crate::protocol::one_line(&t.label)
            ));
            if let Some(e) = &t.last_error {
                out.push_str(&format!(
                    "target-error {} {}\n",
                    t.id,
                    crate::protocol::one_line(e)
                ));
            }
        }
        out
    }

    /// The Prometheus text exposition of the snapshot.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP nix_post_build_hook_queue_{name} {help}\n# TYPE nix_post_build_hook_queue_{name} {kind}\nnix_post_build_hook_queue_{name} {value}\n"
            ));
        };
        metric(
            "queued",
            "gauge",
            "Paths journaled and not yet uploaded.",
            self.queued.to_string(),
        );
        metric(
            "in_flight",
            "gauge",
            "Paths in the batch being uploaded now.",
            self.in_flight.to_string(),
        );
        metric(
            "backing_off",
            "gauge",
            "Paths waiting to be retried after a failure.",
            self.backing_off.to_string(),
        );
        metric(
            "spool_files",
            "gauge",
            "Request files the hook left in the spool, not yet queued.",
            self.spool_files.to_string(),
        );
        metric(
            "spool_paths",
            "gauge",
            "Paths in those spool files.",
            self.spool_paths.to_string(),
        );
        metric(
            "failed",
            "gauge",
            "Paths given up on after repeated failures, kept until requeued or dropped.",
            self.failed.len().to_string(),
        );
        metric(
            "given_up_total",
            "counter",
            "Paths given up on after repeated failures since the daemon started.",
            self.given_up_total.to_string(),
        );
        metric(
            "uploaded_total",
            "counter",
            "Paths signed and uploaded to every target since the daemon started.",
            self.uploaded.to_string(),
        );
        metric(
            "dropped_total",
            "counter",
            "Paths given up on since the daemon started.",
            self.dropped.to_string(),
        );
        metric(
            "failed_calls_total",
            "counter",
            "Failed nix calls since the daemon started.",
            self.failed_calls.to_string(),
        );
        metric(
            "oldest_queued_age_seconds",
            "gauge",
            "Age of the oldest queued path (0 when the queue is empty).",
            self.oldest_queued_seconds.unwrap_or(0).to_string(),
        );
        let targets: Vec<&TargetSnapshot> =
            self.targets.iter().filter(|t| t.label != "-").collect();
        let per_target: [PerTarget; 7] = [
            ("target_queued", "gauge", "Queued paths this target does not have yet (those given up on aside).", |t| t.queued.to_string()),
            ("target_delivered_total", "counter", "Paths this target took since the daemon started.", |t| t.delivered.to_string()),
            ("target_backing_off", "gauge", "Paths waiting to be retried on this target after a failure.", |t| t.backing_off.to_string()),
            ("target_failed", "gauge", "Paths given up on for this target, kept until requeued or dropped.", |t| t.failed.to_string()),
            ("target_given_up_total", "counter", "Paths given up on for this target since the daemon started.", |t| t.given_up_total.to_string()),
            ("target_failed_calls_total", "counter", "Failed calls to this target since the daemon started.", |t| t.failed_calls.to_string()),
            ("target_up", "gauge", "1 when the last call to this target went through (or none was made), 0 when it failed.", |t| u8::from(t.last_error.is_none()).to_string()),
        ];
        if !targets.is_empty() {
            for (name, kind, help, value) in per_target {
                out.push_str(&format!(
                    "# HELP nix_post_build_hook_queue_{name} {help}\n# TYPE nix_post_build_hook_queue_{name} {kind}\n"
                ));
                for t in &targets {
                    out.push_str(&format!(
                        "nix_post_build_hook_queue_{name}{{target=\"{}\"}} {}\n",
                        label_value(&t.label),
                        value(t)
                    ));
                }
            }
        }
        out.push_str(
            "# HELP nix_post_build_hook_queue_upload_duration_seconds Time spent in successful upload batches.\n\
             # TYPE nix_post_build_hook_queue_upload_duration_seconds summary\n",
        );
        out.push_str(&format!(
            "nix_post_build_hook_queue_upload_duration_seconds_sum {:.6}\nnix_post_build_hook_queue_upload_duration_seconds_count {}\n",
            self.upload_seconds, self.upload_batches
        ));
        out
    }
}

/// A per-target metric: name, type, help, and its value for a target.
type PerTarget = (
    &'static str,
    &'static str,
    &'static str,
    fn(&TargetSnapshot) -> String,
);

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
            s.targets[0].backoff.insert(
                path("a"),
                Backoff {
                    attempts: 2,
                    counted: 0,
                    next_try: Some(Instant::now() + Duration::from_secs(60)),
                    last_error: "cannot open 'ssh://u:pw@h?secret-key=/k'\nsecond line".into(),
                },
            );
            // Being retried by the worker.
            s.targets[0].backoff.insert(
                path("b"),
                Backoff {
                    attempts: 1,
                    counted: 1,
                    next_try: None,
                    last_error: "x".into(),
                },
            );
        }
        let snap = Snapshot::take(&journal, &shared, &dir.join("spool"), true);
        assert_eq!(snap.queued, 2);
        assert_eq!(snap.backoff[0].1, 0.0, "being retried: due now");
        assert_eq!(snap.backoff[0].2, path("b"));
        assert!((50.0..=60.0).contains(&snap.backoff[1].1));
        let lines = snap.reply_lines();
        assert!(lines.contains("\nqueued 2\n"), "{lines}");
        assert!(lines.contains("\nbacking-off 2\n"), "{lines}");
        assert!(lines.contains("\ntarget ssh://u:***@h\n"), "{lines}");
        assert!(
            lines.contains(&format!(
                "backoff 2 {:.1} {} cannot open 'ssh://u:***@h?secret-key=***' second line\n",
                snap.backoff[1].1,
                path("a")
            )),
            "{lines}"
        );
        assert!(!lines.contains("pw") && !lines.contains("/k"), "{lines}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn prometheus_text_declares_every_sample() {
        let snap = Snapshot {
            uptime_seconds: 5,
            queued: 3,
            in_flight: 1,
            in_flight_paths: Vec::new(),
            spool_files: 2,
            spool_paths: 5,
            upload_rate_per_minute: 1.5,
            uploaded: 7,
            dropped: 1,
            failed_calls: 2,
            oldest_queued_seconds: Some(9),
            upload_seconds: 1.5,
            upload_batches: 4,
            signing: false,
            target: Some("file:///a, file:///b".into()),
            backing_off: 0,
            backoff: Vec::new(),
            given_up_total: 1,
            failed: Vec::new(),
            targets: ["file:///a", "upload-command: x \"y\""]
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
                .collect(),
        };
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
        assert!(text.contains("nix_post_build_hook_queue_queued 3\n"));
        assert!(text.contains("nix_post_build_hook_queue_oldest_queued_age_seconds 9\n"));
        assert!(text.contains("nix_post_build_hook_queue_upload_duration_seconds_count 4\n"));
        assert!(
            text.contains(
                "nix_post_build_hook_queue_target_delivered_total{target=\"file:///a\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "nix_post_build_hook_queue_target_up{target=\"upload-command: x \\\"y\\\"\"} 1\n"
            ),
            "{text}"
        );
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
