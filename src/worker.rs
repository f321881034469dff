//! The worker: signs and uploads queued paths in batches with `nix`, outside
//! the build loop, each target at its own pace.
//!
//! Its front thread, fed through an `mpsc` channel by the connection threads
//! once they journaled the paths, gathers a batch while paths keep coming (a
//! build in progress; a pending `wait` cuts that short), finds the outputs
//! of derivations, drops paths gone from the store, signs the batch once and
//! hands it to every target's lane. A lane is a thread with a channel of its
//! own: it copies what it was handed and follows [`crate::policy`] when a
//! call fails (canary, bisection, backoff, giving up). A target that is down
//! is not called before its failed group's next try; what comes meanwhile
//! joins that group. The lanes own the retry state and publish it in
//! [`Shared`]; the journal records which target has a path, and the path
//! leaves it once every target has it.

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

/// Messages to the worker.
#[derive(Debug)]
pub enum Msg {
    /// These paths were journaled and are ready for upload.
    Queued(Vec<StorePath>),
    /// Make every backing-off path due now.
    Retry,
    /// A `wait` is pending: start the batch being gathered now, without its
    /// quiet period.
    Flush,
    /// Finish the calls in progress and return.
    Shutdown,
}

/// Messages to a lane: a batch (`true`: signed already), or as [`Msg`].
enum ToLane {
    Batch(Vec<StorePath>, bool),
    Retry,
    Shutdown,
}

/// What the front and the lanes share.
struct Ctx {
    journal: Arc<Journal>,
    shared: Arc<Shared>,
    policy: Policy,
    signing_key: Option<PathBuf>,
    sign_closure: bool,
    batch_size: usize,
    ids: Vec<TargetId>,
    /// Some target is more than "sign only".
    uploads: bool,
    /// Some signing or upload is configured.
    work: bool,
}

/// Builds come first: the uploads take the CPU the builds leave, and every
/// nix call a thread starts inherits its nice.
fn lower_priority() {
    if let Err(e) = sys::lower_thread_priority(UPLOAD_NICE) {
        warning!("cannot lower the worker's CPU priority: {e}");
    }
}

/// Handles the messages that come within `wait`, and those queued behind
/// them. `None` when a stop was asked for or the senders are gone, else
/// whether any came.
fn receive<T>(rx: &Receiver<T>, wait: Duration, mut stop: impl FnMut(T) -> bool) -> Option<bool> {
    let first = match rx.recv_timeout(wait) {
        Ok(msg) => msg,
        Err(RecvTimeoutError::Timeout) => return Some(false),
        Err(RecvTimeoutError::Disconnected) => return None,
    };
    let mut msgs = std::iter::once(first).chain(rx.try_iter());
    (!msgs.any(&mut stop)).then_some(true)
}

/// The worker's threads; run them with [`Worker::run`].
pub struct Worker {
    rx: Receiver<Msg>,
    front: Front,
    lanes: Vec<(Lane, Receiver<ToLane>)>,
}

/// The front thread's state.
struct Front {
    ctx: Arc<Ctx>,
    /// nix for signing and queries.
    nix: Nix,
    store_dir: String,
    spool: Spool,
    ready: VecDeque<StorePath>,
    /// A `wait` is pending: no quiet period.
    flush: bool,
    txs: Vec<Sender<ToLane>>,
    /// Derivations whose outputs could not be found, with their next try.
    drvs: HashMap<StorePath, (Failures, Instant)>,
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
        let uploads = targets.iter().any(|t| !matches!(t.kind, Kind::SignOnly));
        // The stop thread kills the calls in progress through these.
        let running = shared.running();
        let nix_for = |url: Option<&str>, i: usize| {
            Nix::from_config(config, url).with_running(Arc::clone(&running[i]))
        };
        let ctx = Arc::new(Ctx {
            journal,
            shared,
            policy: Policy {
                max_attempts: config.max_attempts,
                give_up_after: config.give_up_after,
                retry_initial: config.retry_initial_delay,
                retry_max: config.retry_max_delay,
            },
            signing_key: config.signing_key_file.clone(),
            sign_closure: config.sign_closure,
            batch_size: config.batch_size,
            ids: targets.iter().map(|t| t.id).collect(),
            uploads,
            work: config.signing_key_file.is_some() || uploads,
        });
        let (mut lanes, mut txs) = (Vec::new(), Vec::new());
        for (i, target) in targets.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            txs.push(tx);
            let url = match &target.kind {
                Kind::Url(url) => Some(url.as_str()),
                _ => None,
            };
            let lane = Lane {
                ctx: Arc::clone(&ctx),
                i,
                nix: nix_for(url, i + 1),
                target,
                limit: config.batch_size,
                held: HashMap::new(),
                down: None,
                streak: Streak::default(),
                sign: false,
            };
            lanes.push((lane, rx));
        }
        let front = Front {
            nix: nix_for(None, 0),
            ctx,
            store_dir: config.store_dir.clone(),
            spool: Spool::new(&config.spool_dir(), &config.store_dir),
            ready: VecDeque::new(),
            flush: false,
            txs,
            drvs: HashMap::new(),
        };
        Worker { rx, front, lanes }
    }

    /// Runs until [`Msg::Shutdown`] arrives or every sender is gone; then
    /// stops the lanes and waits for their calls.
    pub fn run(self) {
        let Worker {
            rx,
            mut front,
            lanes,
        } = self;
        if !front.ctx.work {
            info!("none of signing-key-file, upload-to and upload-command is set: paths are acknowledged and then dropped from the queue, nothing to do");
        }
        let mut threads = Vec::new();
        for (lane, rx) in lanes {
            let thread = std::thread::Builder::new().name(format!("lane {}", lane.i));
            match thread.spawn(move || lane.run(rx)) {
                Ok(t) => threads.push(t),
                Err(e) => return error!("cannot start a thread for a target: {e}"),
            }
        }
        // After the lanes started: a thread inherits its creator's nice.
        lower_priority();
        front.ingest_spool();
        loop {
            let next_drv = front.drvs.values().map(|d| d.1).min();
            let wait = match next_drv {
                _ if !front.ready.is_empty() => Duration::ZERO,
                Some(next) => next
                    .saturating_duration_since(Instant::now())
                    .min(IDLE_TICK),
                None => IDLE_TICK,
            };
            if receive(&rx, wait, |m| front.handle(m)).is_none() || !front.gather(&rx) {
                break;
            }
            if front.ctx.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let now = Instant::now();
            let due = front.drvs.iter().filter(|d| d.1 .1 <= now);
            let due: Vec<StorePath> = due.map(|d| d.0.clone()).collect();
            front.ready.extend(due);
            if front.ready.is_empty() {
                front.flush = false;
                front.ingest_spool();
            } else {
                let batch = front.take_batch();
                front.process(batch);
            }
        }
        for tx in &front.txs {
            let _ = tx.send(ToLane::Shutdown);
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Front {
    /// While paths keep arriving, gathers them into one batch: until none
    /// came for [`BATCH_QUIET`], the batch is full, [`BATCH_MAX_WAIT`]
    /// passed or a `wait` asks for it. False when a stop was asked for.
    fn gather(&mut self, rx: &Receiver<Msg>) -> bool {
        let start = Instant::now();
        while !self.flush
            && !self.ready.is_empty()
            && self.ready.len() < self.ctx.batch_size
            && start.elapsed() < BATCH_MAX_WAIT
        {
            match receive(rx, BATCH_QUIET, |m| self.handle(m)) {
                None => return false,
                Some(false) => break,
                Some(true) => {}
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
        let journal = &self.ctx.journal;
        while batch.len() < self.ctx.batch_size {
            match self.ready.front() {
                Some(p) if batch.is_empty() || bytes + p.as_str().len() < MAX_ARG_BYTES => {}
                _ => break,
            }
            let Some(p) = self.ready.pop_front() else {
                break;
            };
            let settled = |&id| journal.is_settled(&p, id);
            let needed = journal.entry(&p).is_some() && !self.ctx.ids.iter().all(settled);
            if needed && taken.insert(p.clone()) {
                bytes += p.as_str().len() + 1;
                batch.push(p);
            }
        }
        batch
    }

    /// Resolves, checks and signs a batch once, then hands it to the lanes.
    fn process(&mut self, batch: Vec<StorePath>) {
        let ctx = Arc::clone(&self.ctx);
        ctx.shared.lock().in_flight_paths.clone_from(&batch);
        let batch = self.resolve_derivations(batch);
        let batch = drop_gone(&ctx, &self.nix, batch);
        // Once per batch, before any copy. When it fails, each lane signs
        // what it copies, so that its bisection finds the paths at fault.
        let signed = match &ctx.signing_key {
            Some(key) if ctx.uploads && !batch.is_empty() => {
                let signed = self.nix.sign(key, ctx.sign_closure, &batch);
                if let Err(e) = &signed {
                    ctx.shared.lock().failed_calls += 1;
                    warning!("signing a batch of {} paths failed: {e}", batch.len());
                }
                signed.is_ok()
            }
            _ => false,
        };
        for tx in self.txs.iter().filter(|_| !batch.is_empty()) {
            let _ = tx.send(ToLane::Batch(batch.clone(), signed));
        }
        ctx.shared.lock().in_flight_paths.clear();
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
            match self.ctx.journal.replace(&path, &outputs) {
                Ok(added) => {
                    self.drvs.remove(&path);
                    out.extend(added);
                }
                Err(e) => {
                    let error = format!("cannot journal the outputs: {e}");
                    self.unresolved(path, &error, Blame::Target);
                }
            }
        }
        let why = "the derivation is no longer in the store";
        drop_paths(&self.ctx.journal, &self.ctx.shared, &gone, why);
        out
    }

    fn query_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, String> {
        let lines = self.nix.query_outputs(std::slice::from_ref(drv));
        let parse = |l: &String| {
            StorePath::parse_output(l, &self.store_dir)
                .map_err(|e| format!("nix-store printed {l:?}: {e}"))
        };
        lines
            .map_err(|e| e.to_string())?
            .iter()
            .map(parse)
            .collect()
    }

    /// Backs off a derivation that could not be resolved (once for every
    /// target), or gives up on it.
    fn unresolved(&mut self, path: StorePath, error: &str, blame: Blame) {
        let now = Instant::now();
        let mut f = self.drvs.remove(&path).map(|d| d.0).unwrap_or_default();
        let attempts = f.attempts + 1;
        let Some(why) = self.ctx.policy.fail(&mut f, attempts, blame, now) else {
            let delay = self.ctx.policy.delay(attempts, random_unit());
            let next = delay.as_secs_f64();
            warning!("cannot find the outputs of {path} (attempt {attempts}, next try in {next:.1} s): {error}");
            self.drvs.insert(path, (f, now + delay));
            return;
        };
        for i in 0..self.ctx.ids.len() {
            give_up(&self.ctx, i, &path, attempts, error);
        }
        warning!("giving up on {path} after {why}: {error}");
    }

    /// Queues the requests clients left in the spool while we were away or
    /// busy, once some lane has no call in progress.
    fn ingest_spool(&mut self) {
        let stats = self.ctx.shared.lock();
        if stats.targets.iter().any(|t| t.in_flight.is_empty()) {
            drop(stats);
            let paths = self.spool.ingest(&self.ctx.journal);
            self.ready.extend(paths);
        }
    }
}

/// Drops the paths of `batch` that are gone from the store (garbage
/// collected); returns the others.
fn drop_gone(ctx: &Ctx, nix: &Nix, batch: Vec<StorePath>) -> Vec<StorePath> {
    if !ctx.work || batch.is_empty() {
        return batch;
    }
    match nix.invalid_paths(&batch) {
        Ok(invalid) if !invalid.is_empty() => {
            let (gone, valid): (Vec<StorePath>, Vec<StorePath>) = batch
                .into_iter()
                .partition(|p| invalid.iter().any(|i| i == p.as_str()));
            let why = "no longer valid in the store (garbage-collected?)";
            drop_paths(&ctx.journal, &ctx.shared, &gone, why);
            valid
        }
        _ => batch,
    }
}

/// Journals that `path` is given up on for target `i`; false when that
/// failed (it is retried).
fn give_up(ctx: &Ctx, i: usize, path: &StorePath, attempts: u32, error: &str) -> bool {
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let error = error.to_string();
    let record = GivenUp {
        target: ctx.ids[i],
        at,
        attempts,
        error,
    };
    match ctx.journal.give_up(path, record) {
        Ok(given_up) => {
            let mut stats = ctx.shared.lock();
            stats.given_up += u64::from(given_up);
            stats.targets[i].given_up += u64::from(given_up);
            true
        }
        Err(e) => {
            warning!("cannot journal that {path} is given up on ({e}); it is retried");
            false
        }
    }
}

/// A path a lane still needs.
struct Held {
    failures: Failures,
    /// `None` while it is being retried.
    next_try: Option<Instant>,
    error: String,
    signed: bool,
}

/// One target's thread: its calls, canary, bisection and backoff.
struct Lane {
    ctx: Arc<Ctx>,
    i: usize,
    target: Target,
    /// nix with this target's settings, publishing its call in progress.
    nix: Nix,
    /// Most paths in the next call (see [`policy::next_limit`]).
    limit: usize,
    /// The paths it still needs: handed over and not tried yet (no
    /// attempts), or backing off.
    held: HashMap<StorePath, Held>,
    /// While the target is down: its failed group's next try, attempts and
    /// error.
    down: Option<(Instant, u32, String)>,
    streak: Streak<StorePath>,
    /// The paths of the round in progress are signed before each copy.
    sign: bool,
}

impl Lane {
    fn run(mut self, rx: Receiver<ToLane>) {
        lower_priority();
        loop {
            let now = Instant::now();
            let down = self.down.as_ref().map(|d| d.0).filter(|&until| until > now);
            let next = down.or_else(|| self.held.values().filter_map(|h| h.next_try).min());
            let wait = next.map_or(IDLE_TICK, |t| t.saturating_duration_since(now));
            let Some(mut changed) = receive(&rx, wait.min(IDLE_TICK), |m| self.handle(m)) else {
                return;
            };
            if self.ctx.shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            let now = Instant::now();
            if self.down.as_ref().is_none_or(|d| d.0 <= now) {
                let batch = self.take(now);
                if !batch.is_empty() {
                    // Shown as being retried during the call.
                    self.publish();
                    self.round(batch);
                    changed = true;
                }
            }
            if changed {
                self.publish();
            }
        }
    }

    /// True for [`ToLane::Shutdown`].
    fn handle(&mut self, msg: ToLane) -> bool {
        let now = Instant::now();
        match msg {
            ToLane::Batch(paths, signed) => {
                // While the target is down, new paths join the failed group.
                let (next_try, attempts, error) = match &self.down {
                    Some((until, attempts, error)) if *until > now => (*until, *attempts, error),
                    _ => (now, 0, &String::new()),
                };
                for p in paths {
                    let failures = Failures {
                        attempts,
                        ..Failures::default()
                    };
                    let (next_try, error) = (Some(next_try), error.clone());
                    let h = Held {
                        failures,
                        next_try,
                        error,
                        signed,
                    };
                    self.held.entry(p).or_insert(h);
                }
            }
            ToLane::Retry => {
                self.down = None;
                for h in self.held.values_mut() {
                    h.next_try = h.next_try.map(|_| now);
                }
            }
            ToLane::Shutdown => return true,
        }
        false
    }

    /// The next call's paths: those due, in the order they were queued,
    /// within the batch limit.
    fn take(&mut self, now: Instant) -> Vec<StorePath> {
        let (journal, id) = (&self.ctx.journal, self.target.id);
        let due = self
            .held
            .iter()
            .filter(|h| h.1.next_try.is_some_and(|t| t <= now));
        let mut due: Vec<StorePath> = due.map(|h| h.0.clone()).collect();
        due.sort_by_key(|p| journal.entry(p).map_or(u64::MAX, |e| e.seq));
        let (mut out, mut bytes, mut retries) = (Vec::new(), 0, false);
        self.sign = false;
        for p in due {
            let settled = journal.is_settled(&p, id);
            if journal.entry(&p).is_none() || settled {
                self.held.remove(&p);
                continue;
            }
            bytes += p.as_str().len() + 1;
            let full = out.len() >= self.limit.min(self.ctx.batch_size);
            if full || !out.is_empty() && bytes > MAX_ARG_BYTES {
                break;
            }
            if let Some(h) = self.held.get_mut(&p) {
                h.next_try = None;
                self.sign |= !h.signed;
                retries |= h.failures.attempts > 0;
                out.push(p);
            }
        }
        // Retried: gone from the store meanwhile?
        match retries {
            true => drop_gone(&self.ctx, &self.nix, out),
            false => out,
        }
    }

    /// One call for `batch`; when it fails, the policy's canary, bisection
    /// and backoff, within this round.
    fn round(&mut self, batch: Vec<StorePath>) {
        let (len, max) = (batch.len(), self.ctx.batch_size);
        let (mut groups, mut answer, mut budget) = (vec![batch], None, 0);
        let (mut first, mut note) = (true, None);
        while let Some(mut group) = groups.pop() {
            if !first && self.ctx.shared.stopping.load(Ordering::SeqCst) {
                return; // Still journaled: uploaded after the restart.
            }
            let started = Instant::now();
            match self.attempt(&group) {
                Ok(()) => {
                    if first {
                        self.limit = policy::next_limit(self.limit, len, false, max);
                    }
                    self.took(&group, started);
                    answer = Some(Answer::TookSome);
                }
                Err(f) => match self.next(&group, &f, first, budget, &mut answer) {
                    Next::Outage => {
                        if group.len() > 1 && f.timed_out() {
                            self.limit = policy::next_limit(self.limit, group.len(), true, max);
                            let (n, to, limit) = (group.len(), self.named(), self.limit);
                            warning!("a batch of {n} paths timed out{to}; the next batches take at most {limit}");
                        }
                        group.extend(groups.drain(..).flatten());
                        self.back_off(group, &f, Blame::Target);
                    }
                    Next::Judge => {
                        let blame = self.judge(&group[0], &mut answer);
                        if blame == Blame::Target {
                            // An outage after all: the rest waits with it.
                            group.extend(groups.drain(..).flatten());
                        }
                        self.back_off(group, &f, blame);
                    }
                    Next::Canary => {
                        let counted = group.iter().map(|p| self.counted(p)).collect::<Vec<_>>();
                        let canary = group.remove(policy::pick_canary(&counted, random_unit()));
                        budget = policy::bisection_budget(group.len());
                        note = Some(format!("batch of {len} paths failed while the target{} works, splitting it to find the paths at fault: {f}", self.named()));
                        groups.extend([group, vec![canary]]);
                        first = false;
                        continue;
                    }
                    Next::Split => {
                        budget -= 1;
                        let right = group.split_off(group.len() / 2);
                        groups.extend([right, group]);
                    }
                    Next::BackOff => self.back_off(group, &f, Blame::Target),
                },
            }
            first = false;
            // After the canary, unless that ended the round.
            if let Some(note) = note.take().filter(|_| !groups.is_empty()) {
                warning!("{note}");
            }
        }
    }

    /// The policy's next step; before a canary, asks the target whether
    /// it answers at all (a ping costs less than a copy).
    fn next(
        &self,
        group: &[StorePath],
        f: &Failure,
        first: bool,
        budget: u32,
        answer: &mut Option<Answer>,
    ) -> Next {
        match policy::after_failure(group.len(), f.timed_out(), first, budget) {
            Next::Canary if *answer.get_or_insert_with(|| self.ask()) == Answer::Silent => {
                Next::Outage
            }
            next => next,
        }
    }

    fn counted(&self, path: &StorePath) -> u32 {
        self.held.get(path).map_or(0, |h| h.failures.counted)
    }

    /// Whom to blame for `path`, which failed alone: asks the target once a
    /// round, unless a call of the round went through.
    fn judge(&mut self, path: &StorePath, answer: &mut Option<Answer>) -> Blame {
        let a = *answer.get_or_insert_with(|| self.ask());
        let refuses_all = a == Answer::Answers && self.streak.failed(path.clone());
        if refuses_all {
            let (n, to) = (policy::REFUSES_ALL, self.named());
            info!("{n} different paths failed alone while the target{to} answers and took none: it seems to refuse everything, which does not count against the paths");
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
                let to = self.named();
                info!("the target{to} does not answer either, so the failure does not count against the path: {e}");
                Answer::Silent
            }
        }
    }

    /// Copies the paths (signing them first if the round must).
    fn attempt(&self, paths: &[StorePath]) -> Result<(), Failure> {
        self.ctx.shared.lock().targets[self.i].in_flight = paths.to_vec();
        let result = match (&self.ctx.signing_key, self.sign) {
            (Some(key), true) => self.nix.sign(key, self.ctx.sign_closure, paths),
            _ => Ok(()),
        };
        let result = result.and_then(|()| match &self.target.kind {
            Kind::Url(url) => self.nix.copy(url, paths),
            Kind::Command(argv) => self.nix.run_uploader(argv, paths),
            Kind::SignOnly => Ok(()),
        });
        self.ctx.shared.lock().targets[self.i].in_flight.clear();
        if let Err(f) = &result {
            self.count_failure(f);
        }
        result
    }

    /// ` LABEL` when there are several targets, else nothing.
    fn named(&self) -> String {
        match self.ctx.ids.len() {
            1 => String::new(),
            _ => format!(" {}", self.target.label),
        }
    }

    fn count_failure(&self, failure: &Failure) {
        let mut stats = self.ctx.shared.lock();
        stats.failed_calls += 1;
        let t = &mut stats.targets[self.i];
        t.failed_calls += 1;
        t.last_error = Some(failure.to_string());
    }

    /// Records that the target has the paths: those every target has now
    /// leave the journal.
    fn took(&mut self, paths: &[StorePath], started: Instant) {
        let (ctx, took) = (Arc::clone(&self.ctx), started.elapsed().as_secs_f64());
        self.down = None;
        self.streak.took();
        for p in paths {
            self.held.remove(p);
        }
        let done = ctx.journal.deliver(paths, self.target.id, &ctx.ids);
        let done = done.unwrap_or_else(|e| {
            // After a restart they are uploaded once more, which is harmless.
            warning!("cannot journal {} finished paths: {e}", paths.len());
            Vec::new()
        });
        let to = self.named();
        if ctx.work {
            let (n, names) = (paths.len(), names(paths));
            info!("uploaded {n} path(s) ({names}){to} in {took:.3} s");
        }
        let mut stats = ctx.shared.lock();
        stats.uploaded += done.len() as u64;
        stats.record_uploads(done.len() as u64);
        if ctx.work {
            stats.upload_seconds += took;
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
        let held = paths.iter().filter_map(|p| self.held.get(p));
        let attempts = 1 + held.map(|h| h.failures.attempts).max().unwrap_or(0);
        let next_try = now + self.ctx.policy.delay(attempts, random_unit());
        let mut kept = Vec::new();
        for p in paths {
            let (next_try, error) = (Some(next_try), error.clone());
            let h = self.held.remove(&p);
            let signed = h.as_ref().is_some_and(|h| h.signed);
            let failures = h.map(|h| h.failures).unwrap_or_default();
            let mut h = Held {
                failures,
                next_try,
                error,
                signed,
            };
            match self.ctx.policy.fail(&mut h.failures, attempts, blame, now) {
                Some(why) if give_up(&self.ctx, self.i, &p, attempts, &h.error) => {
                    let (on, e) = (self.named().replacen(' ', " for ", 1), &h.error);
                    warning!("giving up on {p}{on} after {why}: {e}; it stays in the journal, not tried again until `post-build-hook-queue requeue {p}` (or `drop {p}`)");
                }
                _ => {
                    kept.push(p.clone());
                    self.held.insert(p, h);
                }
            }
        }
        if !kept.is_empty() {
            let (n, names, to) = (kept.len(), names(&kept), self.named());
            let next = next_try.saturating_duration_since(now).as_secs_f64();
            warning!("{n} path(s) ({names}) failed attempt {attempts}{to}, next try in {next:.1} s: {error}");
        }
        if blame == Blame::Target {
            self.down = Some((next_try, attempts, error));
        }
    }

    /// Shows the paths backing off in `status` (forgetting those dropped).
    fn publish(&mut self) {
        let journal = &self.ctx.journal;
        self.held.retain(|p, _| journal.entry(p).is_some());
        let failed = self.held.iter().filter(|h| h.1.failures.attempts > 0);
        let view = failed.map(|(p, h)| {
            let (attempts, next_try) = (h.failures.attempts, h.next_try);
            (
                p.clone(),
                Backoff {
                    attempts,
                    next_try,
                    last_error: h.error.clone(),
                },
            )
        });
        self.ctx.shared.lock().targets[self.i].backoff = view.collect();
    }
}

/// Drops queued paths from the journal, with one warning for them all: they
/// are not uploaded. Returns how many were queued. Used by the worker
/// (paths gone from the store) and by the `drop` request.
pub fn drop_paths(journal: &Journal, shared: &Shared, paths: &[StorePath], why: &str) -> usize {
    let queued = paths.iter().filter(|p| journal.entry(p).is_some());
    let paths: Vec<StorePath> = queued.cloned().collect();
    let count = match paths.len() {
        0 => return 0,
        1 => String::new(),
        n => format!(" ({n} paths)"),
    };
    warning!("dropping {}{count}: {why}", names(&paths));
    {
        let mut stats = shared.lock();
        for p in &paths {
            stats.forget(p);
        }
        stats.dropped += paths.len() as u64;
    }
    journal.drop_paths(&paths).len()
}

/// The first few of `paths`, for a log line: `A, B, C, ...`.
fn names(paths: &[StorePath]) -> String {
    let named: Vec<String> = paths.iter().take(3).map(StorePath::to_string).collect();
    named.join(", ") + if paths.len() > 3 { ", ..." } else { "" }
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

    const STORE: &str = "/nix/store";

    fn path(name: &str) -> StorePath {
        let p = format!("{STORE}/0123456789abcdfghijklmnpqrsvwxyz-{name}");
        StorePath::parse(&p, STORE).unwrap()
    }

    #[test]
    fn a_pending_wait_starts_the_batch_without_its_quiet_period() {
        let dir = std::env::temp_dir().join(format!("npbhq-worker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (journal, _) = Journal::open(&dir, STORE).unwrap();
        let policy = Policy {
            max_attempts: None,
            give_up_after: None,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(1),
        };
        let ctx = Ctx {
            journal: Arc::new(journal),
            shared: Arc::default(),
            policy,
            signing_key: None,
            sign_closure: false,
            batch_size: 10,
            ids: Vec::new(),
            uploads: false,
            work: false,
        };
        let mut front = Front {
            ctx: Arc::new(ctx),
            nix: Nix::new(std::path::Path::new("nix"), Duration::from_secs(1), None),
            store_dir: STORE.into(),
            spool: Spool::new(&dir.join("spool"), STORE),
            ready: VecDeque::from([path("a")]),
            flush: false,
            txs: Vec::new(),
            drvs: HashMap::new(),
        };
        let (tx, rx) = mpsc::channel();
        // Without a wait, a path that comes within the quiet period joins.
        tx.send(Msg::Queued(vec![path("b")])).unwrap();
        assert!(front.gather(&rx));
        assert_eq!(front.ready.len(), 2);
        // With one, the batch starts as it is.
        assert!(!front.handle(Msg::Flush));
        tx.send(Msg::Queued(vec![path("c")])).unwrap();
        assert!(front.gather(&rx));
        assert_eq!(front.ready.len(), 2);
        assert!(matches!(rx.try_recv(), Ok(Msg::Queued(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let xs: Vec<f64> = (0..100).map(|_| random_unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.iter().any(|x| (x - xs[0]).abs() > 1e-9));
    }
}
