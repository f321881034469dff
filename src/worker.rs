//! The worker: takes queued paths in batches and signs and uploads them with
//! `nix`, outside the build loop, each target at its own pace.
//!
//! Its front thread is fed through an `mpsc` channel by the connection
//! threads (after they journaled the paths). While paths keep coming (a
//! build in progress) it gathers them for a moment rather than start nix for
//! every few, leaving the CPU to the build; a pending `wait` starts the batch
//! at once. For each batch it finds the outputs of derivations, drops paths
//! gone from the store and signs the batch once, then hands it to every
//! target's lane.
//!
//! A lane is a thread of one target with a channel of its own: it copies
//! what it was handed, and when a call fails it follows the retry policy
//! ([`crate::policy`]): a canary, bisection, backoff and giving up. A target
//! that is down is not called again before its group's next try; what comes
//! meanwhile joins that group. A lane's call never delays another's. The
//! journal records which target has a path (`>`); the path leaves it once
//! every target has it. The lanes own the retry state and publish it in
//! [`Shared`] for `status` and `wait`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::journal::{GivenUp, Journal, TargetId};
use crate::nix::{Failure, Nix, MAX_ARG_BYTES};
use crate::policy::{self, Answer, Blame, Failures, Next, Policy, Streak};
use crate::spool::Spool;
use crate::status::{Backoff, Shared};
use crate::store_path::StorePath;
use crate::target::{Kind, Target};
use crate::{drv, error, info, sys, warning};

/// A batch starts once no new path arrived for this long...
const BATCH_QUIET: Duration = Duration::from_millis(200);
/// ...or once it has waited this long for more paths.
const BATCH_MAX_WAIT: Duration = Duration::from_secs(2);
/// Nice steps the worker, and so every nix call, runs below the daemon.
pub const UPLOAD_NICE: i32 = 10;
/// How often an idle thread looks up (the spool, the stop flag).
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Longest `nix store ping` may take when a path failed alone.
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);
/// Paths named in a log line about many.
const NAMED: usize = 3;

/// Messages to the worker.
#[derive(Debug)]
pub enum Msg {
    /// These paths were journaled and are ready for upload.
    Queued(Vec<StorePath>),
    /// Make every backing-off path due now.
    Retry,
    /// A `wait` is pending: start the batch being gathered now, without
    /// its quiet period.
    Flush,
    /// Finish the current calls and return.
    Shutdown,
}

/// Messages to a lane.
enum ToLane {
    /// Paths to deliver; `true` when the batch is signed already.
    Batch(Vec<StorePath>, bool),
    Retry,
    Shutdown,
}

/// Builds come first: the uploads (xz compression, signing) take the CPU
/// the builds leave, and every nix call a thread starts inherits its nice.
fn lower_priority() {
    if let Err(e) = sys::lower_thread_priority(UPLOAD_NICE) {
        warning!("cannot lower the worker's CPU priority: {e}");
    }
}

/// The front thread; run it with [`Worker::run`].
pub struct Worker {
    journal: Arc<Journal>,
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    /// nix for signing and queries.
    nix: Nix,
    store_dir: String,
    signing_key: Option<PathBuf>,
    sign_closure: bool,
    batch_size: usize,
    spool: Spool,
    ready: VecDeque<StorePath>,
    /// A `wait` is pending: no quiet period.
    flush: bool,
    lanes: Vec<Lane>,
    txs: Vec<Sender<ToLane>>,
    ids: Vec<TargetId>,
    policy: Policy,
    /// Derivations whose outputs could not be found, with their next try.
    drvs: HashMap<StorePath, (Failures, Instant)>,
    has_targets: bool,
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
        let targets = crate::target::configured(config);
        let ids: Vec<TargetId> = targets.iter().map(|t| t.id).collect();
        let policy = Policy {
            max_attempts: config.max_attempts,
            give_up_after: config.give_up_after,
            retry_initial: config.retry_initial_delay,
            retry_max: config.retry_max_delay,
        };
        let has_targets = targets.iter().any(|t| !matches!(t.kind, Kind::SignOnly));
        let work = config.signing_key_file.is_some() || has_targets;
        // The stop thread kills the calls in progress through these.
        let running = shared.running();
        let nix_for = |url: Option<&str>, i: usize| {
            Nix::from_config(config, url).with_running(Arc::clone(&running[i]))
        };
        let (mut lanes, mut txs) = (Vec::new(), Vec::new());
        for (i, target) in targets.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            txs.push(tx);
            let url = match &target.kind {
                Kind::Url(url) => Some(url.as_str()),
                _ => None,
            };
            lanes.push(Lane {
                i,
                nix: nix_for(url, i + 1),
                target,
                journal: Arc::clone(&journal),
                shared: Arc::clone(&shared),
                rx,
                ids: ids.clone(),
                policy: policy.clone(),
                signing_key: config.signing_key_file.clone(),
                sign_closure: config.sign_closure,
                batch_size: config.batch_size,
                limit: config.batch_size,
                fresh: VecDeque::new(),
                held: HashMap::new(),
                down: None,
                streak: Streak::default(),
                sign: false,
                several: ids.len() > 1,
                work,
            });
        }
        Worker {
            nix: nix_for(None, 0),
            journal,
            shared,
            rx,
            store_dir: config.store_dir.clone(),
            signing_key: config.signing_key_file.clone(),
            sign_closure: config.sign_closure,
            batch_size: config.batch_size,
            spool: Spool::new(&config.spool_dir(), &config.store_dir),
            ready: VecDeque::new(),
            flush: false,
            lanes,
            txs,
            ids,
            policy,
            drvs: HashMap::new(),
            has_targets,
        }
    }

    /// Runs until [`Msg::Shutdown`] arrives or every sender is gone; then
    /// stops the lanes and waits for their calls.
    pub fn run(mut self) {
        lower_priority();
        if self.signing_key.is_none() && !self.has_targets {
            info!("none of signing-key-file, upload-to and upload-command is set: paths are acknowledged and then dropped from the queue, nothing to do");
        }
        let mut threads = Vec::new();
        for lane in std::mem::take(&mut self.lanes) {
            let name = format!("lane {}", lane.i);
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || lane.run())
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    error!("cannot start a thread for a target: {e}");
                    return;
                }
            }
        }
        self.ingest_spool();
        loop {
            let wait = match self.drvs.values().map(|d| d.1).min() {
                _ if !self.ready.is_empty() => Duration::ZERO,
                Some(next) => next
                    .saturating_duration_since(Instant::now())
                    .min(IDLE_TICK),
                None => IDLE_TICK,
            };
            let mut stop = match self.rx.recv_timeout(wait) {
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            while let Ok(msg) = self.rx.try_recv() {
                stop |= self.handle(msg);
            }
            if stop || !self.gather() || self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let now = Instant::now();
            let due: Vec<StorePath> = self
                .drvs
                .iter()
                .filter(|d| d.1 .1 <= now)
                .map(|d| d.0.clone())
                .collect();
            self.ready.extend(due);
            if self.ready.is_empty() {
                self.flush = false;
                self.ingest_spool();
                continue;
            }
            let batch = self.take_batch();
            self.process(batch);
        }
        for tx in &self.txs {
            let _ = tx.send(ToLane::Shutdown);
        }
        for t in threads {
            let _ = t.join();
        }
    }

    /// While paths keep arriving, gathers them into one batch: until none
    /// came for [`BATCH_QUIET`], the batch is full, [`BATCH_MAX_WAIT`]
    /// passed or a `wait` asks for it. False when a stop was asked for.
    fn gather(&mut self) -> bool {
        let start = Instant::now();
        while !self.flush
            && !self.ready.is_empty()
            && self.ready.len() < self.batch_size
            && start.elapsed() < BATCH_MAX_WAIT
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

    /// True for [`Msg::Shutdown`].
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Queued(paths) => self.ready.extend(paths),
            Msg::Flush => self.flush = true,
            Msg::Retry => {
                for d in self.drvs.values_mut() {
                    d.1 = Instant::now();
                }
                for tx in &self.txs {
                    let _ = tx.send(ToLane::Retry);
                }
            }
            Msg::Shutdown => return true,
        }
        false
    }

    /// The next batch: queued paths some target still needs, each once.
    fn take_batch(&mut self) -> Vec<StorePath> {
        let (mut taken, mut batch, mut bytes) = (HashSet::new(), Vec::new(), 0);
        while batch.len() < self.batch_size {
            let Some(next) = self.ready.front() else {
                break;
            };
            bytes += next.as_str().len() + 1;
            if !batch.is_empty() && bytes > MAX_ARG_BYTES {
                break;
            }
            let Some(p) = self.ready.pop_front() else {
                break;
            };
            let needed = self.journal.entry(&p).is_some()
                && self.ids.iter().any(|&id| {
                    !self.journal.is_delivered(&p, id) && !self.journal.is_given_up(&p, id)
                });
            if needed && taken.insert(p.clone()) {
                batch.push(p);
            }
        }
        batch
    }

    /// Resolves, checks and signs a batch once, then hands it to the lanes.
    fn process(&mut self, batch: Vec<StorePath>) {
        self.shared.lock().in_flight_paths.clone_from(&batch);
        let mut batch = self.resolve_derivations(batch);
        if self.signing_key.is_some() || self.has_targets {
            if let Ok(invalid) = self.nix.invalid_paths(&batch) {
                let (gone, valid): (Vec<StorePath>, Vec<StorePath>) = batch
                    .into_iter()
                    .partition(|p| invalid.iter().any(|i| i == p.as_str()));
                drop_paths(
                    &self.journal,
                    &self.shared,
                    &gone,
                    "no longer valid in the store (garbage-collected?)",
                );
                batch = valid;
            }
        }
        // Once per batch, before any copy. When it fails, each lane signs
        // what it copies, so that its bisection finds the paths at fault.
        let signed = match &self.signing_key {
            Some(key) if self.has_targets && !batch.is_empty() => {
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
        if !batch.is_empty() {
            for tx in &self.txs {
                let _ = tx.send(ToLane::Batch(batch.clone(), signed));
            }
        }
        self.shared.lock().in_flight_paths.clear();
    }

    /// Replaces derivations by their outputs, in the journal and the batch.
    fn resolve_derivations(&mut self, batch: Vec<StorePath>) -> Vec<StorePath> {
        let (mut out, mut gone) = (Vec::with_capacity(batch.len()), Vec::new());
        for path in batch {
            if !path.is_drv() {
                out.push(path);
                continue;
            }
            let outputs = match drv::read_outputs(&path, &self.store_dir) {
                Ok(outputs) => outputs,
                Err(drv::DrvError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    gone.push(path);
                    continue;
                }
                Err(_) => match self.query_outputs(&path) {
                    Ok(outputs) => outputs,
                    Err(e) => {
                        self.unresolved(path, &e, Blame::Paths);
                        continue;
                    }
                },
            };
            match self.journal.replace(&path, &outputs) {
                Ok(added) => {
                    self.shared.lock().forget(&path);
                    self.drvs.remove(&path);
                    out.extend(added);
                }
                Err(e) => self.unresolved(
                    path,
                    &format!("cannot journal the outputs: {e}"),
                    Blame::Target,
                ),
            }
        }
        drop_paths(
            &self.journal,
            &self.shared,
            &gone,
            "the derivation is no longer in the store",
        );
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

    /// Backs off a derivation that could not be resolved (for every target:
    /// it is resolved once for all), or gives up on it.
    fn unresolved(&mut self, path: StorePath, error: &str, blame: Blame) {
        let now = Instant::now();
        let mut f = self.drvs.remove(&path).map(|d| d.0).unwrap_or_default();
        let attempts = f.attempts + 1;
        let Some(why) = self.policy.fail(&mut f, attempts, blame, now) else {
            let delay = self.policy.delay(attempts, random_unit());
            warning!("cannot find the outputs of {path} (attempt {attempts}, next try in {:.1} s): {error}", delay.as_secs_f64());
            self.drvs.insert(path, (f, now + delay));
            return;
        };
        for (i, &target) in self.ids.iter().enumerate() {
            let record = GivenUp {
                target,
                at: unix_now(),
                attempts,
                error: error.to_string(),
            };
            if let Ok(true) = self.journal.give_up(&path, record) {
                let mut stats = self.shared.lock();
                stats.given_up += 1;
                stats.targets[i].given_up += 1;
            }
        }
        warning!("giving up on {path} after {why}: {error}");
    }

    /// Queues the requests clients left in the spool while we were away or
    /// busy, once some lane has no call in progress.
    fn ingest_spool(&mut self) {
        if self
            .shared
            .lock()
            .targets
            .iter()
            .all(|t| !t.in_flight.is_empty())
        {
            return;
        }
        let paths = self.spool.ingest(&self.journal);
        self.ready.extend(paths);
    }
}

/// A path backing off on a lane.
struct Held {
    failures: Failures,
    /// `None` while it is being retried.
    next_try: Option<Instant>,
    error: String,
    /// Signed already (else signed before each copy).
    signed: bool,
}

/// One target's thread: its calls, canary, bisection and backoff.
struct Lane {
    i: usize,
    target: Target,
    /// nix with this target's settings, publishing its call in progress.
    nix: Nix,
    journal: Arc<Journal>,
    shared: Arc<Shared>,
    rx: Receiver<ToLane>,
    ids: Vec<TargetId>,
    policy: Policy,
    signing_key: Option<PathBuf>,
    sign_closure: bool,
    batch_size: usize,
    /// Most paths in the next call: `batch_size`, halved after a call timed
    /// out, doubled after each success.
    limit: usize,
    /// Handed over and not tried yet, with whether they are signed.
    fresh: VecDeque<(StorePath, bool)>,
    held: HashMap<StorePath, Held>,
    /// While the target is down: its failed group's next try, attempts and
    /// error.
    down: Option<(Instant, u32, String)>,
    streak: Streak<StorePath>,
    /// The paths of the round in progress are to be signed before a copy.
    sign: bool,
    several: bool,
    /// Some signing or target is configured.
    work: bool,
}

impl Lane {
    fn run(mut self) {
        lower_priority();
        loop {
            let now = Instant::now();
            let wait = match self.held.values().filter_map(|h| h.next_try).min() {
                _ if !self.fresh.is_empty() && self.down.as_ref().is_none_or(|d| d.0 <= now) => {
                    Duration::ZERO
                }
                Some(next) => next.saturating_duration_since(now).min(IDLE_TICK),
                None => IDLE_TICK,
            };
            let (mut stop, mut changed) = match self.rx.recv_timeout(wait) {
                Ok(msg) => (self.handle(msg), true),
                Err(RecvTimeoutError::Timeout) => (false, false),
                Err(RecvTimeoutError::Disconnected) => (true, false),
            };
            while let Ok(msg) = self.rx.try_recv() {
                stop |= self.handle(msg);
            }
            if stop || self.stopping() {
                return;
            }
            let now = Instant::now();
            match self.down {
                Some((until, attempts, ref error)) if until > now => {
                    // Tried with the failed group at its next try.
                    for (p, signed) in std::mem::take(&mut self.fresh) {
                        let failures = Failures {
                            attempts,
                            ..Failures::default()
                        };
                        let error = error.clone();
                        let h = Held {
                            failures,
                            next_try: Some(until),
                            error,
                            signed,
                        };
                        self.held.entry(p).or_insert(h);
                    }
                }
                _ => {
                    let batch = self.take(now);
                    changed |= !batch.is_empty();
                    if !batch.is_empty() {
                        // Shown as being retried during the call.
                        self.publish();
                        self.round(batch);
                    }
                }
            }
            if changed {
                self.publish();
            }
        }
    }

    fn handle(&mut self, msg: ToLane) -> bool {
        match msg {
            ToLane::Batch(paths, signed) => {
                let fresh = paths.into_iter().filter(|p| !self.held.contains_key(p));
                self.fresh.extend(fresh.map(|p| (p, signed)));
            }
            ToLane::Retry => {
                self.down = None;
                for h in self.held.values_mut() {
                    h.next_try = h.next_try.map(|_| Instant::now());
                }
            }
            ToLane::Shutdown => return true,
        }
        false
    }

    fn needs(&self, p: &StorePath) -> bool {
        let id = self.target.id;
        self.journal.entry(p).is_some()
            && !self.journal.is_delivered(p, id)
            && !self.journal.is_given_up(p, id)
    }

    /// The next call's paths: those due, then the fresh ones, in the order
    /// they were queued, within the batch limit.
    fn take(&mut self, now: Instant) -> Vec<StorePath> {
        let mut due: Vec<StorePath> = self
            .held
            .iter()
            .filter(|h| h.1.next_try.is_some_and(|t| t <= now))
            .map(|h| h.0.clone())
            .collect();
        due.sort_by_key(|p| self.journal.entry(p).map_or(u64::MAX, |e| e.seq));
        let mut due = due.into_iter();
        let (mut out, mut seen, mut bytes) = (Vec::new(), HashSet::new(), 0);
        self.sign = false;
        while out.len() < self.limit.min(self.batch_size) {
            let next = due.next().map(|p| (p, None));
            let Some((p, fresh)) =
                next.or_else(|| self.fresh.pop_front().map(|(p, s)| (p, Some(s))))
            else {
                break;
            };
            if !self.needs(&p) {
                self.held.remove(&p);
                continue;
            }
            if !seen.insert(p.clone()) {
                continue;
            }
            bytes += p.as_str().len() + 1;
            if !out.is_empty() && bytes > MAX_ARG_BYTES {
                if let Some(signed) = fresh {
                    self.fresh.push_front((p, signed));
                }
                break;
            }
            let signed = match self.held.get_mut(&p) {
                Some(h) => {
                    h.next_try = None;
                    h.signed
                }
                None => fresh.unwrap_or(false),
            };
            self.sign |= !signed;
            out.push(p);
        }
        out
    }

    /// One call for `batch`; when it fails, the policy's canary, bisection
    /// and backoff.
    fn round(&mut self, batch: Vec<StorePath>) {
        let started = Instant::now();
        let failure = match self.attempt(&batch) {
            Ok(()) => {
                self.limit = policy::next_limit(self.limit, batch.len(), false, self.batch_size);
                return self.took(&batch, started);
            }
            Err(failure) => failure,
        };
        let mut answer = None;
        match policy::after_failure(batch.len(), failure.timed_out()) {
            Next::BackOff => {
                if batch.len() > 1 {
                    self.limit = policy::next_limit(self.limit, batch.len(), true, self.batch_size);
                    warning!(
                        "a batch of {} paths timed out{}; the next batches take at most {}",
                        batch.len(),
                        self.named(),
                        self.limit
                    );
                }
                return self.back_off(batch, &failure, Blame::Target);
            }
            Next::Judge => {
                let blame = self.judge(&batch[0], &mut answer);
                return self.back_off(batch, &failure, blame);
            }
            Next::Canary if self.stopping() => {
                return self.back_off(batch, &failure, Blame::Target)
            }
            Next::Canary => {}
        }
        let mut rest = batch;
        let counted: Vec<u32> = rest
            .iter()
            .map(|p| self.held.get(p).map_or(0, |h| h.failures.counted))
            .collect();
        let canary = rest.remove(policy::pick_canary(&counted, random_unit()));
        let started = Instant::now();
        match self.attempt(std::slice::from_ref(&canary)) {
            Ok(()) => {
                self.took(std::slice::from_ref(&canary), started);
                answer = Some(Answer::TookSome);
            }
            Err(f) => {
                let blame = if f.timed_out() {
                    Blame::Target
                } else {
                    self.judge(&canary, &mut answer)
                };
                if blame == Blame::Target {
                    rest.push(canary);
                    return self.back_off(rest, &f, Blame::Target);
                }
                self.back_off(vec![canary], &f, Blame::Paths);
            }
        }
        warning!("batch of {} paths failed while the target{} works, splitting it to find the paths at fault: {failure}", rest.len() + 1, self.named());
        let mut budget = policy::bisection_budget(rest.len());
        let mut groups = vec![rest];
        while let Some(mut group) = groups.pop() {
            if self.stopping() {
                return; // Still journaled: uploaded after the restart.
            }
            let started = Instant::now();
            let f = match self.attempt(&group) {
                Ok(()) => {
                    self.took(&group, started);
                    answer = Some(Answer::TookSome);
                    continue;
                }
                Err(f) => f,
            };
            if group.len() > 1 && budget > 0 && !f.timed_out() {
                budget -= 1;
                let right = group.split_off(group.len() / 2);
                groups.extend([right, group]);
            } else if group.len() == 1 && !f.timed_out() {
                let blame = self.judge(&group[0], &mut answer);
                if blame == Blame::Target {
                    // An outage after all: the rest waits with this path.
                    group.extend(groups.drain(..).flatten());
                }
                self.back_off(group, &f, blame);
            } else {
                self.back_off(group, &f, Blame::Target);
            }
        }
    }

    /// Whom to blame for `path`, which failed alone: asks the target once a
    /// round (unless a call of the round went through).
    fn judge(&mut self, path: &StorePath, answer: &mut Option<Answer>) -> Blame {
        let a = *answer.get_or_insert_with(|| self.ask());
        let refuses_all = a == Answer::Answers && self.streak.failed(path.clone());
        if refuses_all {
            info!("{} different paths failed alone while the target{} answers and took none: it seems to refuse everything, which does not count against the paths", policy::REFUSES_ALL, self.named());
        }
        policy::blame_alone(a, refuses_all)
    }

    fn ask(&self) -> Answer {
        let url = match &self.target.kind {
            Kind::Command(_) => return Answer::Unknown,
            Kind::SignOnly => return Answer::Answers,
            Kind::Url(url) => url,
        };
        match self.nix.ping(url, PING_TIMEOUT.min(self.nix.timeout())) {
            Ok(()) => Answer::Answers,
            Err(e) => {
                self.count_failure(&e);
                info!("the target{} does not answer either, so the failure does not count against the path: {e}", self.named());
                Answer::Silent
            }
        }
    }

    /// Copies the paths (signing them first if the round must).
    fn attempt(&self, paths: &[StorePath]) -> Result<(), Failure> {
        self.shared.lock().targets[self.i].in_flight = paths.to_vec();
        let result = match (&self.signing_key, self.sign) {
            (Some(key), true) => self.nix.sign(key, self.sign_closure, paths),
            _ => Ok(()),
        }
        .and_then(|()| match &self.target.kind {
            Kind::Url(url) => self.nix.copy(url, paths),
            Kind::Command(argv) => self.nix.run_uploader(argv, paths),
            Kind::SignOnly => Ok(()),
        });
        self.shared.lock().targets[self.i].in_flight.clear();
        if let Err(f) = &result {
            self.count_failure(f);
        }
        result
    }

    /// ` LABEL` when there are several targets, else nothing.
    fn named(&self) -> String {
        match self.several {
            true => format!(" {}", self.target.label),
            false => String::new(),
        }
    }

    fn count_failure(&self, failure: &Failure) {
        let mut stats = self.shared.lock();
        stats.failed_calls += 1;
        let t = &mut stats.targets[self.i];
        t.failed_calls += 1;
        t.last_error = Some(failure.to_string());
    }

    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// Records that the target has the paths: those every target has now
    /// leave the journal.
    fn took(&mut self, paths: &[StorePath], started: Instant) {
        let took = started.elapsed();
        self.down = None;
        self.streak.took();
        for p in paths {
            self.held.remove(p);
        }
        let done = self
            .journal
            .deliver(paths, self.target.id, &self.ids)
            .unwrap_or_else(|e| {
                // After a restart they are uploaded once more, which is harmless.
                warning!("cannot journal {} finished paths: {e}", paths.len());
                Vec::new()
            });
        if self.work && !paths.is_empty() {
            info!(
                "uploaded {}{} in {:.3} s",
                some_of(paths),
                self.named(),
                took.as_secs_f64()
            );
        }
        let mut stats = self.shared.lock();
        stats.uploaded += done.len() as u64;
        stats.record_uploads(done.len() as u64);
        if self.work {
            stats.upload_seconds += took.as_secs_f64();
            stats.upload_batches += 1;
        }
        let t = &mut stats.targets[self.i];
        t.delivered += paths.len() as u64;
        t.last_error = None;
        for p in &done {
            stats.forget(p);
        }
    }

    /// Backs off paths that failed together: one attempt count and one next
    /// try for the group, so that it is retried in one call. Paths at the
    /// end of their tries are given up on instead. A failure blamed on the
    /// target makes it count as down until then.
    fn back_off(&mut self, paths: Vec<StorePath>, error: &Failure, blame: Blame) {
        let (now, error) = (Instant::now(), error.to_string());
        let attempts = 1 + paths
            .iter()
            .filter_map(|p| self.held.get(p))
            .map(|h| h.failures.attempts)
            .max()
            .unwrap_or(0);
        let next_try = now + self.policy.delay(attempts, random_unit());
        let mut kept = Vec::new();
        for p in paths {
            let mut h = self.held.remove(&p).unwrap_or(Held {
                failures: Failures::default(),
                next_try: None,
                error: String::new(),
                signed: false,
            });
            h.signed &= !self.sign;
            (h.next_try, h.error) = (Some(next_try), error.clone());
            match self.policy.fail(&mut h.failures, attempts, blame, now) {
                Some(why) if self.give_up(&p, &h.failures, &error, &why) => {}
                _ => {
                    kept.push(p.clone());
                    self.held.insert(p, h);
                }
            }
        }
        if !kept.is_empty() {
            warning!(
                "{} failed attempt {attempts}{}, next try in {:.1} s: {error}",
                some_of(&kept),
                self.named(),
                next_try.saturating_duration_since(now).as_secs_f64()
            );
        }
        if blame == Blame::Target {
            self.down = Some((next_try, attempts, error));
        }
    }

    /// Journals that `path` is given up on for this target; false when that
    /// failed (it is retried).
    fn give_up(&self, path: &StorePath, f: &Failures, error: &str, why: &str) -> bool {
        let record = GivenUp {
            target: self.target.id,
            at: unix_now(),
            attempts: f.attempts,
            error: error.to_string(),
        };
        match self.journal.give_up(path, record) {
            Ok(given_up) => {
                if given_up {
                    let mut stats = self.shared.lock();
                    stats.given_up += 1;
                    stats.targets[self.i].given_up += 1;
                    drop(stats);
                    let on = if self.several {
                        format!(" for{}", self.named())
                    } else {
                        String::new()
                    };
                    warning!("giving up on {path}{on} after {why}: {error}; it stays in the journal, not tried again until `post-build-hook-queue requeue {path}` (or `drop {path}`)");
                }
                true
            }
            Err(e) => {
                warning!("cannot journal that {path} is given up on ({e}); it is retried");
                false
            }
        }
    }

    /// Shows the paths backing off in `status` (those dropped meanwhile
    /// forgotten).
    fn publish(&mut self) {
        let journal = &self.journal;
        self.held.retain(|p, _| journal.entry(p).is_some());
        let view = self.held.iter().map(|(p, h)| {
            let b = Backoff {
                attempts: h.failures.attempts,
                next_try: h.next_try,
                last_error: h.error.clone(),
            };
            (p.clone(), b)
        });
        self.shared.lock().targets[self.i].backoff = view.collect();
    }
}

/// `PATH` or `N paths (A, B, C, ...)`, for a log line.
fn some_of(paths: &[StorePath]) -> String {
    match paths {
        [one] => one.to_string(),
        _ => {
            let named: Vec<String> = paths.iter().take(NAMED).map(StorePath::to_string).collect();
            let more = if paths.len() > NAMED { ", ..." } else { "" };
            format!("{} paths ({}{more})", paths.len(), named.join(", "))
        }
    }
}

/// Drops queued paths from the journal, with one warning for them all: they
/// are not uploaded. Returns how many were queued. Used by the worker
/// (paths gone from the store) and by the `drop` request.
pub fn drop_paths(journal: &Journal, shared: &Shared, paths: &[StorePath], why: &str) -> usize {
    let queued: Vec<(StorePath, u64)> = paths
        .iter()
        .filter_map(|p| journal.entry(p).map(|e| (p.clone(), e.seq)))
        .collect();
    if queued.is_empty() {
        return 0;
    }
    let paths: Vec<StorePath> = queued.iter().map(|(p, _)| p.clone()).collect();
    warning!("dropping {}: {why}", some_of(&paths));
    // Counted before the journal lets go of them: a `wait` that sees them
    // gone from the journal must also see them dropped.
    {
        let mut stats = shared.lock();
        for (p, seq) in &queued {
            stats.forget(p);
            stats.record_drop(Some(*seq));
        }
    }
    if let Err(e) = journal.complete(&paths) {
        warning!("cannot journal {} dropped paths: {e}", paths.len());
    }
    paths.len()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
