//! The one worker thread: takes queued paths in batches and signs and uploads
//! them with `nix`, outside the build loop.
//!
//! It is fed through an `mpsc` channel by the connection threads (after they
//! journaled the paths) and owns the order of work. While paths keep coming
//! (a build in progress) it gathers them for a moment rather than start nix
//! for every few, leaving the CPU to the build. For each batch it finds
//! the outputs of derivations, drops paths that are gone from the store, then
//! runs one `nix store sign` and one `nix copy`. When a batch fails, one of
//! its paths is tried alone: if that fails too, the target is taken to be
//! down and the whole batch backs off as one group (two calls per retry in an
//! outage, whatever the batch size); if it goes through, the rest is split in
//! halves to find the paths at fault, within a budget of calls. Failing paths
//! back off exponentially with jitter, a group sharing one timer. Only
//! success or a drop removes a path from the journal.
//!
//! Several targets: every path goes to each of them. A batch is signed once,
//! before any copy; then each target that still needs some of its paths
//! gets its own call, its own canary, bisection and backoff (targets whose
//! last call went through first). A target that is down (its last failure
//! was blamed on it) is not called again before its group's next try: new
//! paths join that group, so an outage of one target costs one call per
//! retry and never holds back the others. The journal records which target
//! has a path (`>`); the path leaves it once every target has it, so after
//! a crash only the targets that lack a path get it.
//!
//! Failure has an end: a path that failed `max-attempts` times while the
//! target answered (it failed alone, and the target took other paths or
//! answered `nix store ping`), or that still fails `give-up-after` after it
//! was queued, is given up on: journaled as such, no longer tried, and no
//! longer waited for, until an operator requeues or drops it. Failures while
//! the target is down (a call timed out, or the one-path canary failed too)
//! do not count towards `max-attempts`: an outage is not the paths' fault.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::journal::{GivenUp, Journal, TargetId};
use crate::nix::{Failure, Nix, MAX_ARG_BYTES};
use crate::spool::Spool;
use crate::status::{Backoff, Shared};
use crate::store_path::StorePath;
use crate::target::{Kind, Target};
use crate::{drv, info, sys, warning};

/// A batch starts once no new path arrived for this long...
const BATCH_QUIET: Duration = Duration::from_millis(200);
/// ...or once it has waited this long for more paths.
const BATCH_MAX_WAIT: Duration = Duration::from_secs(2);
/// Nice steps the worker, and so every nix call, runs below the daemon.
pub const UPLOAD_NICE: i32 = 10;
/// How often an idle worker looks at the spool directory.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Longest `nix store ping` may take when a path failed alone and the
/// worker asks whether the target answers at all.
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// Messages to the worker.
#[derive(Debug)]
pub enum Msg {
    /// These paths were journaled and are ready for upload.
    Queued(Vec<StorePath>),
    /// Make every backing-off path due now.
    Retry,
    /// Finish the current batch and return.
    Shutdown,
    /// A `wait` is pending: start the batch being gathered now, without its
    /// quiet period.
    Flush,
}

/// One target as the worker sees it.
struct Lane {
    target: Target,
    /// nix with this target's settings (a connect timeout for ssh).
    nix: Nix,
    /// While the target is down (its last failure was blamed on it): the
    /// failed group's next try, its attempts and error. New paths join that
    /// group instead of costing a call each.
    down: Option<(Instant, u32, String)>,
}

/// The worker's state; run it with [`Worker::run`] on its own thread.
pub struct Worker {
    journal: Arc<Journal>,
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    /// nix for what is not a target's: signing, queries.
    nix: Nix,
    store_dir: String,
    signing_key: Option<PathBuf>,
    /// The targets, in the order of `Shared`'s per-target statistics.
    lanes: Vec<Lane>,
    /// Their journal names, for [`Journal::deliver`].
    target_ids: Vec<TargetId>,
    max_attempts: Option<u32>,
    give_up_after: Option<Duration>,
    sign_closure: bool,
    batch_size: usize,
    retry_initial: Duration,
    retry_max: Duration,
    spool: Spool,
    ready: VecDeque<StorePath>,
    /// Most paths in the next batch: `batch_size`, halved after a batch timed
    /// out (it may have been too big to finish in `command-timeout`) and
    /// doubled again after each success.
    batch_limit: usize,
}

impl Worker {
    /// A worker for `config`, reading messages from `rx`. Its targets are
    /// [`crate::target::configured`], as `shared` was made for.
    pub fn new(
        config: &Config,
        journal: Arc<Journal>,
        shared: Arc<Shared>,
        rx: Receiver<Msg>,
    ) -> Worker {
        // The stop thread kills the call in progress through `running_pgid`
        // when it outlasts the grace period.
        let nix_for = |url: Option<&str>| {
            Nix::from_config(config, url).with_running(Arc::clone(&shared.running_pgid))
        };
        let lanes: Vec<Lane> = crate::target::configured(config)
            .into_iter()
            .map(|target| Lane {
                nix: nix_for(match &target.kind {
                    Kind::Url(url) => Some(url),
                    _ => None,
                }),
                target,
                down: None,
            })
            .collect();
        Worker {
            journal,
            nix: nix_for(None),
            target_ids: lanes.iter().map(|l| l.target.id).collect(),
            lanes,
            shared,
            rx,
            store_dir: config.store_dir.clone(),
            signing_key: config.signing_key_file.clone(),
            max_attempts: config.max_attempts,
            give_up_after: config.give_up_after,
            sign_closure: config.sign_closure,
            batch_size: config.batch_size,
            retry_initial: config.retry_initial_delay,
            retry_max: config.retry_max_delay.max(config.retry_initial_delay),
            spool: Spool::new(&config.spool_dir(), &config.store_dir),
            ready: VecDeque::new(),
            batch_limit: config.batch_size,
        }
    }

    /// True when some target is more than "sign only".
    fn has_targets(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| !matches!(l.target.kind, Kind::SignOnly))
    }

    fn has_work_to_do(&self) -> bool {
        self.signing_key.is_some() || self.has_targets()
    }

    /// Runs until [`Msg::Shutdown`] arrives or every sender is gone.
    pub fn run(mut self) {
        // Builds come first: on a busy machine the uploads (xz compression,
        // signing) take the CPU the builds leave, while the threads that
        // acknowledge the hook keep their priority.
        if let Err(e) = sys::lower_thread_priority(UPLOAD_NICE) {
            warning!("cannot lower the worker's CPU priority: {e}");
        }
        if !self.has_work_to_do() {
            info!("none of signing-key-file, upload-to and upload-command is set: paths are acknowledged and then dropped from the queue, nothing to do");
        }
        self.ingest_spool();
        loop {
            let wait = if self.ready.is_empty() {
                self.next_due().map_or(IDLE_TICK, |d| d.min(IDLE_TICK))
            } else {
                Duration::ZERO
            };
            let mut shutdown = false;
            match self.rx.recv_timeout(wait) {
                Ok(msg) => shutdown |= self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(msg) = self.rx.try_recv() {
                shutdown |= self.handle(msg);
            }
            if !shutdown && !self.gather() {
                return;
            }
            if shutdown || self.shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            self.promote_due();
            if self.ready.is_empty() {
                self.ingest_spool();
                continue;
            }
            let batch = self.take_batch();
            self.process(batch);
        }
    }

    /// While paths keep arriving (a build in progress), gathers them into
    /// one batch instead of starting nix for every few: until none came for
    /// [`BATCH_QUIET`], the batch is full, or [`BATCH_MAX_WAIT`] passed.
    /// Returns false when the channel is gone or a stop was asked for.
    fn gather(&mut self) -> bool {
        let full = self.batch_limit.min(self.batch_size);
        let start = Instant::now();
        while !self.ready.is_empty() && self.ready.len() < full && start.elapsed() < BATCH_MAX_WAIT
        {
            match self.rx.recv_timeout(BATCH_QUIET) {
                Ok(msg) => {
                    if self.handle(msg) {
                        return false;
                    }
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        true
    }

    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Queued(paths) => self.ready.extend(paths),
            Msg::Retry => {
                let now = Instant::now();
                // Paths already being retried (no next try) stay as they are,
                // so that none is queued twice.
                for t in &mut self.shared.lock().targets {
                    for b in t.backoff.values_mut() {
                        if b.next_try.is_some() {
                            b.next_try = Some(now);
                        }
                    }
                }
                for lane in &mut self.lanes {
                    lane.down = None;
                }
            }
            Msg::Shutdown => return true,
            Msg::Flush => {}
        }
        false
    }

    fn next_due(&self) -> Option<Duration> {
        let stats = self.shared.lock();
        let next = stats
            .targets
            .iter()
            .flat_map(|t| t.backoff.values())
            .filter_map(|b| b.next_try)
            .min()?;
        Some(next.saturating_duration_since(Instant::now()))
    }

    /// Moves backing-off paths whose time has come to the ready queue, in
    /// the order they were queued.
    fn promote_due(&mut self) {
        let now = Instant::now();
        let mut due: Vec<StorePath> = {
            let mut stats = self.shared.lock();
            let mut due = std::collections::HashSet::new();
            for t in &mut stats.targets {
                // Keep the entries (attempt counts) until the path succeeds.
                for (p, b) in t.backoff.iter_mut() {
                    if b.next_try.is_some_and(|t| t <= now) {
                        b.next_try = None;
                        due.insert(p.clone());
                    }
                }
            }
            due.into_iter().collect()
        };
        due.sort_by_key(|p| self.journal.entry(p).map_or(u64::MAX, |e| e.seq));
        self.ready.extend(due);
    }

    /// True when target `lane` still needs queued `path`: it neither has
    /// it nor is given up on for it, and it is not waiting for the path's
    /// next try.
    fn needs(&self, lane: usize, path: &StorePath) -> bool {
        let id = self.lanes[lane].target.id;
        !self.journal.is_delivered(path, id)
            && !self.journal.is_given_up(path, id)
            && self.shared.lock().targets[lane]
                .backoff
                .get(path)
                .is_none_or(|b| b.next_try.is_none())
    }

    fn take_batch(&mut self) -> Vec<StorePath> {
        let mut taken = std::collections::HashSet::new();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < self.batch_limit.min(self.batch_size) {
            let Some(next) = self.ready.front() else {
                break;
            };
            let len = next.as_str().len() + 1;
            if !batch.is_empty() && bytes + len > MAX_ARG_BYTES {
                break;
            }
            bytes += len;
            if let Some(p) = self.ready.pop_front() {
                // Dropped by an operator meanwhile, settled for every target
                // (given up on, or delivered), or twice in line (due on two
                // targets).
                if self.journal.entry(&p).is_none()
                    || taken.contains(&p)
                    || !(0..self.lanes.len()).any(|i| self.needs(i, &p))
                {
                    continue;
                }
                taken.insert(p.clone());
                batch.push(p);
            }
        }
        batch
    }

    fn drop_paths(&self, paths: &[StorePath], why: &str) {
        drop_paths(&self.journal, &self.shared, paths, why);
    }

    fn process(&mut self, batch: Vec<StorePath>) {
        self.shared.lock().in_flight = batch.len();
        let batch = self.resolve_derivations(batch);
        {
            let mut stats = self.shared.lock();
            stats.in_flight = batch.len();
            stats.in_flight_paths.clone_from(&batch);
        }
        if !batch.is_empty() {
            if self.has_work_to_do() {
                self.upload(batch);
            } else {
                self.finish(0, &batch, Duration::ZERO);
            }
        }
        {
            let mut stats = self.shared.lock();
            stats.in_flight = 0;
            stats.in_flight_paths.clear();
        }
    }

    /// Replaces derivations by their outputs, in the journal and the batch.
    fn resolve_derivations(&mut self, batch: Vec<StorePath>) -> Vec<StorePath> {
        let mut out = Vec::with_capacity(batch.len());
        for path in batch {
            if !path.is_drv() {
                out.push(path);
                continue;
            }
            let outputs = match drv::read_outputs(&path, &self.store_dir) {
                Ok(outputs) => outputs,
                Err(drv::DrvError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.drop_paths(&[path], "the derivation is no longer in the store");
                    continue;
                }
                Err(_) => match self.query_outputs(&path) {
                    Ok(outputs) => outputs,
                    Err(e) => {
                        self.back_off_everywhere(&path, &e, Blame::Paths);
                        continue;
                    }
                },
            };
            match self.journal.replace(&path, &outputs) {
                Ok(added) => {
                    self.shared.lock().forget(&path);
                    out.extend(added);
                }
                Err(e) => self.back_off_everywhere(
                    &path,
                    &format!("cannot journal the outputs: {e}"),
                    Blame::Target,
                ),
            }
        }
        out
    }

    fn query_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, String> {
        let lines = self
            .nix
            .query_outputs(std::slice::from_ref(drv))
            .map_err(|e| e.to_string())?;
        lines
            .iter()
            .map(|l| {
                StorePath::parse_output(l, &self.store_dir)
                    .map_err(|e| format!("nix-store printed {l:?}: {e}"))
            })
            .collect()
    }

    /// Backs off a derivation that could not be resolved, on every target
    /// (it is resolved once for all of them).
    fn back_off_everywhere(
        &mut self,
        path: &StorePath,
        error: &dyn std::fmt::Display,
        blame: Blame,
    ) {
        for lane in 0..self.lanes.len() {
            self.back_off(lane, vec![path.clone()], error, blame);
        }
    }

    /// Signs a batch once, then uploads it to each target that needs some
    /// of its paths, those whose last call went through first.
    fn upload(&mut self, batch: Vec<StorePath>) {
        let batch = match self.nix.invalid_paths(&batch) {
            Ok(invalid) if !invalid.is_empty() => {
                let (gone, valid): (Vec<StorePath>, Vec<StorePath>) = batch
                    .into_iter()
                    .partition(|p| invalid.iter().any(|i| i == p.as_str()));
                self.drop_paths(&gone, "no longer valid in the store (garbage-collected?)");
                valid
            }
            _ => batch,
        };
        if batch.is_empty() {
            return;
        }
        // Once per batch, before any copy. When it fails, each target signs
        // what it copies, so that its bisection finds the paths at fault;
        // nothing is copied unsigned.
        let signed = match &self.signing_key {
            Some(key) if self.has_targets() => {
                match self.nix.sign(key, self.sign_closure, &batch) {
                    Ok(()) => true,
                    Err(e) => {
                        self.shared.lock().failed_calls += 1;
                        warning!("signing a batch of {} paths failed: {e}", batch.len());
                        false
                    }
                }
            }
            _ => false,
        };
        let failing: Vec<bool> = {
            let stats = self.shared.lock();
            stats
                .targets
                .iter()
                .map(|t| t.last_error.is_some())
                .collect()
        };
        let order = (0..self.lanes.len())
            .filter(|&i| !failing[i])
            .chain((0..self.lanes.len()).filter(|&i| failing[i]));
        for lane in order.collect::<Vec<usize>>() {
            if self.stopping() {
                // Still journaled: uploaded after the restart.
                return;
            }
            let todo: Vec<StorePath> = batch
                .iter()
                .filter(|p| self.needs(lane, p))
                .cloned()
                .collect();
            if todo.is_empty() {
                continue;
            }
            match self.lanes[lane].down.clone() {
                Some((retry_at, attempts, error)) if retry_at > Instant::now() => {
                    self.join_outage(lane, todo, retry_at, attempts, &error);
                }
                _ => self.upload_to(lane, todo, !signed),
            }
        }
    }

    /// Adds paths to the group of a target that is down: they are tried
    /// with it at its next try, without a call now.
    fn join_outage(
        &self,
        lane: usize,
        paths: Vec<StorePath>,
        retry_at: Instant,
        attempts: u32,
        error: &str,
    ) {
        let mut stats = self.shared.lock();
        let backoff = &mut stats.targets[lane].backoff;
        for p in paths {
            let counted = backoff.get(&p).map_or(0, |b| b.counted);
            backoff.insert(
                p,
                Backoff {
                    attempts,
                    counted,
                    next_try: Some(retry_at),
                    last_error: error.to_string(),
                },
            );
        }
    }

    /// Uploads a batch to one target. When it fails, one path is tried
    /// alone (a canary): if that fails as well, the target is taken to be
    /// down and the whole batch backs off together, so an outage costs two
    /// calls per retry whatever the batch size. If the canary goes through,
    /// the rest is split in halves to isolate the paths at fault. `sign`:
    /// sign each group before its copy (the batch's signing failed).
    fn upload_to(&mut self, lane: usize, mut batch: Vec<StorePath>, sign: bool) {
        let started = Instant::now();
        let failure = match self.attempt(lane, &batch, sign) {
            Ok(()) => {
                self.batch_limit = self.batch_limit.saturating_mul(2).min(self.batch_size);
                return self.finish(lane, &batch, started.elapsed());
            }
            Err(failure) => failure,
        };
        self.count_failure(lane, &failure);
        if failure.timed_out() {
            // A problem of the target, the network or the batch's size, not
            // of particular paths: no bisection. The target counts as down,
            // so what comes meanwhile waits with this batch (a hung target
            // costs one call per retry), and the next try is smaller in case
            // this batch was too big to finish.
            if batch.len() > 1 {
                self.batch_limit = (batch.len() / 2).max(1);
                warning!(
                    "a batch of {} paths timed out; the next batches take at most {}",
                    batch.len(),
                    self.batch_limit
                );
            }
            return self.back_off(lane, batch, &failure, Blame::Target);
        }
        if self.stopping() {
            return self.back_off(lane, batch, &failure, Blame::Target);
        }
        if batch.len() == 1 {
            let blame = self.blame_alone(lane);
            return self.back_off(lane, batch, &failure, blame);
        }
        let canary = batch.remove(self.pick_canary(lane, &batch));
        let started = Instant::now();
        match self.attempt(lane, std::slice::from_ref(&canary), sign) {
            Ok(()) => self.finish(lane, std::slice::from_ref(&canary), started.elapsed()),
            Err(canary_failure) => {
                self.count_failure(lane, &canary_failure);
                batch.push(canary);
                return self.back_off(lane, batch, &canary_failure, Blame::Target);
            }
        }
        warning!(
            "batch of {} paths failed while the target{} works, splitting it to find the paths at fault: {failure}",
            batch.len() + 1,
            self.named(lane)
        );
        // Enough calls to find one bad path by halving, plus a little.
        let mut budget = 2 * (usize::BITS - batch.len().leading_zeros()) + 2;
        let mut groups = vec![batch];
        while let Some(group) = groups.pop() {
            if self.stopping() {
                // Still journaled: uploaded after the restart.
                return;
            }
            let started = Instant::now();
            match self.attempt(lane, &group, sign) {
                Ok(()) => self.finish(lane, &group, started.elapsed()),
                Err(failure) => {
                    self.count_failure(lane, &failure);
                    if group.len() > 1 && budget > 0 && !failure.timed_out() {
                        budget -= 1;
                        let mut left = group;
                        let right = left.split_off(left.len() / 2);
                        groups.push(right);
                        groups.push(left);
                    } else {
                        // The target works (the canary went through): one
                        // path failing on its own is at fault.
                        let blame = if group.len() == 1 && !failure.timed_out() {
                            Blame::Paths
                        } else {
                            Blame::Target
                        };
                        self.back_off(lane, group, &failure, blame);
                    }
                }
            }
        }
    }

    /// ` LABEL` when there are several targets (to name one in the log),
    /// else nothing.
    fn named(&self, lane: usize) -> String {
        if self.lanes.len() > 1 {
            format!(" {}", self.lanes[lane].target.label)
        } else {
            String::new()
        }
    }

    /// Counts a failed call to target `lane`.
    fn count_failure(&self, lane: usize, failure: &Failure) {
        let mut stats = self.shared.lock();
        stats.failed_calls += 1;
        let t = &mut stats.targets[lane];
        t.failed_calls += 1;
        t.last_error = Some(failure.to_string());
    }

    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// The index of the path to try alone after a batch failed: one with the
    /// fewest failed attempts (a path that failed on its own before is the
    /// likeliest to be at fault), chosen at random among those, so that a bad
    /// canary is not picked again and again.
    fn pick_canary(&self, lane: usize, batch: &[StorePath]) -> usize {
        let stats = self.shared.lock();
        let backoff = &stats.targets[lane].backoff;
        let attempts = |p: &StorePath| backoff.get(p).map_or(0, |b| b.attempts);
        let fewest = batch.iter().map(attempts).min().unwrap_or(0);
        let candidates: Vec<usize> = (0..batch.len())
            .filter(|&i| attempts(&batch[i]) == fewest)
            .collect();
        let pick = (random_unit() * candidates.len() as f64) as usize;
        candidates
            .get(pick)
            .or(candidates.last())
            .copied()
            .unwrap_or(0)
    }

    /// Copies the paths to target `lane` (signing them first if `sign`).
    fn attempt(&self, lane: usize, paths: &[StorePath], sign: bool) -> Result<(), Failure> {
        let lane = &self.lanes[lane];
        if let (Some(key), true) = (&self.signing_key, sign) {
            self.nix.sign(key, self.sign_closure, paths)?;
        }
        match &lane.target.kind {
            Kind::Url(url) => lane.nix.copy(url, paths),
            Kind::Command(argv) => lane.nix.run_uploader(argv, paths),
            Kind::SignOnly => Ok(()),
        }
    }

    /// Records that target `lane` has the paths: those every target has
    /// now leave the journal.
    fn finish(&mut self, lane: usize, paths: &[StorePath], took: Duration) {
        let id = self.lanes[lane].target.id;
        self.lanes[lane].down = None;
        let done = match self.journal.deliver(paths, id, &self.target_ids) {
            Ok(done) => done,
            Err(e) => {
                // After a restart they are uploaded once more, which is
                // harmless.
                warning!("cannot journal {} finished paths: {e}", paths.len());
                Vec::new()
            }
        };
        if self.has_work_to_do() {
            let to = self.named(lane);
            match paths {
                [one] => info!("uploaded {one}{to} in {:.3} s", took.as_secs_f64()),
                [first, ..] => info!(
                    "uploaded {} paths ({first}, ...){to} in {:.3} s",
                    paths.len(),
                    took.as_secs_f64()
                ),
                [] => {}
            }
        }
        let mut stats = self.shared.lock();
        stats.uploaded += done.len() as u64;
        stats.record_uploads(done.len() as u64);
        if self.has_work_to_do() {
            stats.upload_seconds += took.as_secs_f64();
            stats.upload_batches += 1;
        }
        let t = &mut stats.targets[lane];
        t.delivered += paths.len() as u64;
        t.last_error = None;
        for p in paths {
            t.backoff.remove(p);
        }
        for p in &done {
            stats.forget(p);
        }
    }

    /// Whom to blame when a path failed alone on target `lane`: the path if
    /// the target answers `nix store ping` (or there is no target: signing
    /// only), the target if not. An `upload-command` cannot be asked: its
    /// lone failures do not count (the bisection of a failed batch still
    /// finds the paths at fault, and `give-up-after` ends the rest).
    fn blame_alone(&self, lane: usize) -> Blame {
        let this = &self.lanes[lane];
        let url = match &this.target.kind {
            Kind::Command(_) => return Blame::Target,
            Kind::SignOnly => return Blame::Paths,
            Kind::Url(url) => url,
        };
        match this.nix.ping(url, PING_TIMEOUT.min(this.nix.timeout())) {
            Ok(()) => Blame::Paths,
            Err(e) => {
                self.count_failure(lane, &e);
                info!("the target{} does not answer either, so the failure does not count against the path: {e}", self.named(lane));
                Blame::Target
            }
        }
    }

    /// Backs off paths that failed together: they share one attempt count
    /// and one next try, so they are retried together in one call (paths
    /// with timers of their own would each cost a call per retry). Paths at
    /// the end of their tries are given up on instead.
    /// A failure blamed on the target makes it count as down until then.
    fn back_off(
        &mut self,
        lane: usize,
        paths: Vec<StorePath>,
        error: &dyn std::fmt::Display,
        blame: Blame,
    ) {
        let error = error.to_string();
        let paths = self.give_up_on_exhausted(lane, paths, &error, blame);
        let Some(first) = paths.first() else {
            return;
        };
        let to = self.named(lane);
        let mut stats = self.shared.lock();
        let backoff = &mut stats.targets[lane].backoff;
        let attempts = paths
            .iter()
            .map(|p| backoff.get(p).map_or(0, |b| b.attempts))
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let delay = self.delay(attempts);
        let next_try = Instant::now() + delay;
        warning!(
            "{} path(s) ({first}{}) failed attempt {attempts}{to}, next try in {:.1} s: {error}",
            paths.len(),
            if paths.len() > 1 { ", ..." } else { "" },
            delay.as_secs_f64()
        );
        if blame == Blame::Target {
            self.lanes[lane].down = Some((next_try, attempts, error.clone()));
        }
        for p in paths {
            let counted =
                backoff.get(&p).map_or(0, |b| b.counted) + u32::from(blame == Blame::Paths);
            backoff.insert(
                p,
                Backoff {
                    attempts,
                    counted,
                    next_try: Some(next_try),
                    last_error: error.clone(),
                },
            );
        }
    }

    /// Gives up on the paths of a failed call that reached `max-attempts`
    /// (counting this failure if it is theirs) or `give-up-after`; returns
    /// the others, to back off.
    fn give_up_on_exhausted(
        &self,
        lane: usize,
        paths: Vec<StorePath>,
        error: &str,
        blame: Blame,
    ) -> Vec<StorePath> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut keep = Vec::with_capacity(paths.len());
        for path in paths {
            let (attempts, counted) = {
                let stats = self.shared.lock();
                stats.targets[lane]
                    .backoff
                    .get(&path)
                    .map_or((0, 0), |b| (b.attempts, b.counted))
            };
            let (attempts, counted) = (
                attempts.saturating_add(1),
                counted + u32::from(blame == Blame::Paths),
            );
            let too_many = self.max_attempts.is_some_and(|max| counted >= max);
            let queued_at = self.journal.entry(&path).map_or(now, |e| e.queued_at);
            let too_long = self
                .give_up_after
                .is_some_and(|limit| now.saturating_sub(queued_at) >= limit.as_secs());
            if !too_many && !too_long {
                keep.push(path);
                continue;
            }
            let why = if too_many {
                format!("{counted} failed attempts while the target answered")
            } else {
                format!(
                    "still failing {} s after it was queued (give-up-after)",
                    now.saturating_sub(queued_at)
                )
            };
            let record = GivenUp {
                target: self.lanes[lane].target.id,
                at: now,
                attempts,
                error: error.to_string(),
            };
            match self.journal.give_up(&path, record) {
                Ok(given_up) => {
                    let mut stats = self.shared.lock();
                    stats.targets[lane].backoff.remove(&path);
                    if given_up {
                        stats.given_up += 1;
                        stats.targets[lane].given_up += 1;
                        drop(stats);
                        let on = match self.named(lane) {
                            to if to.is_empty() => to,
                            to => format!(" for{to}"),
                        };
                        warning!(
                            "giving up on {path}{on} after {why}: {error}; it stays in the journal, not tried again until `post-build-hook-queue requeue {path}` (or `drop {path}`)"
                        );
                    }
                }
                Err(e) => {
                    warning!("cannot journal that {path} is given up on ({e}); it is retried");
                    keep.push(path);
                }
            }
        }
        keep
    }

    /// Exponential backoff with jitter: between half and all of
    /// `initial * 2^(attempts-1)`, capped at the maximum delay.
    fn delay(&self, attempts: u32) -> Duration {
        let factor = 2f64.powi(attempts.saturating_sub(1).min(40) as i32);
        let full = (self.retry_initial.as_secs_f64() * factor).min(self.retry_max.as_secs_f64());
        Duration::from_secs_f64(full * (0.5 + 0.5 * random_unit()))
    }

    /// Queues the requests clients left in the spool while we were away.
    fn ingest_spool(&mut self) {
        let paths = self.spool.ingest(&self.journal);
        self.ready.extend(paths);
    }
}

/// Drops queued paths from the journal, with a warning for each: they are
/// not uploaded. Returns how many were queued. Used by the worker (paths
/// gone from the store) and by the `drop` request.
pub fn drop_paths(journal: &Journal, shared: &Shared, paths: &[StorePath], why: &str) -> usize {
    let queued: Vec<&StorePath> = paths
        .iter()
        .filter(|p| journal.entry(p).is_some())
        .collect();
    if queued.is_empty() {
        return 0;
    }
    for p in &queued {
        warning!("dropping {p}: {why}");
    }
    {
        let mut stats = shared.lock();
        for p in &queued {
            stats.forget(p);
            stats.dropped += 1;
        }
    }
    journal.drop_paths(paths).len()
}

/// Whose fault a failed call was, for `max-attempts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    /// The paths': the target answered. Counts towards `max-attempts`.
    Paths,
    /// The target's, or unknown (it was down, the call timed out, the
    /// journal could not be written). Does not count.
    Target,
}

/// A number in [0, 1) from the standard library's randomly seeded hasher.
fn random_unit() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let xs: Vec<f64> = (0..100).map(|_| random_unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.iter().any(|x| (x - xs[0]).abs() > 1e-9));
    }
}
