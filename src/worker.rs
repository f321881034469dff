//! The worker: a front thread batches journaled paths, resolves derivations,
//! drops paths gone from the store and signs once; a lane thread per target
//! uploads at its own pace, following [`crate::policy`] when a call fails.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::journal::{GivenUp, Journal, TargetId};
use crate::nix::{self, Failure, Nix, MAX_ARG_BYTES};
use crate::policy::{self, Answer, Blame, Next, Policy, Streak};
use crate::spool::Spool;
use crate::status::{Backoff, Shared, TargetStats};
use crate::store_path::StorePath;
use crate::target::{Kind, Target};
use crate::{drv, error, info, warning};

/// A batch starts once no new path arrived for this long...
const BATCH_QUIET: Duration = Duration::from_millis(200);
/// ...or once it has waited this long for more paths.
const BATCH_MAX_WAIT: Duration = Duration::from_secs(2);
/// How often an idle thread looks up (the spool, the stop flag).
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Messages to the worker.
#[derive(Debug)]
pub enum Msg {
    /// These paths were journaled and are ready for upload.
    Queued(Vec<StorePath>),
    /// Make every backing-off path due now.
    Retry,
    /// A `wait` is pending: start the batch now, without its quiet period; wake it as paths settle.
    Flush(Sender<()>),
    /// Finish the calls in progress and return.
    Shutdown,
}

/// Messages to a lane: a batch (`true`: signed already), or as [`Msg`].
enum ToLane {
    Batch(Vec<StorePath>, bool),
    Retry,
}

struct Ctx {
    config: Config,
    journal: Arc<Journal>,
    shared: Arc<Shared>,
    policy: Policy,
    ids: Vec<TargetId>,
    /// Some target uploads; some signing or upload is configured.
    uploads: bool,
    work: bool,
    waits: Mutex<Vec<Sender<()>>>,
}

impl Ctx {
    /// Whether some target of `ids` still needs `path`.
    fn needed(&self, path: &StorePath, ids: &[TargetId]) -> bool {
        let settled = |&id| self.journal.is_settled(path, id);
        self.journal.entry(path).is_some() && !ids.iter().all(settled)
    }

    /// Wakes the pending `wait`s (and a `new` one); true if some is still pending.
    fn wake(&self, new: Option<Sender<()>>) -> bool {
        let mut waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        waits.extend(new);
        waits.retain(|w| w.send(()).is_ok());
        !waits.is_empty()
    }
}

/// Runs `f` on messages until `at` (at most [`IDLE_TICK`]): `None` if `f` stopped, else if any.
fn receive<T>(rx: &Receiver<T>, at: Option<Instant>, mut f: impl FnMut(T) -> bool) -> Option<bool> {
    let wait = at.map_or(IDLE_TICK, |t| t.saturating_duration_since(Instant::now()));
    let first = match rx.recv_timeout(wait.min(IDLE_TICK)) {
        Ok(msg) => msg,
        Err(RecvTimeoutError::Timeout) => return Some(false),
        Err(RecvTimeoutError::Disconnected) => return None,
    };
    let mut msgs = std::iter::once(first).chain(rx.try_iter());
    (!msgs.any(&mut f)).then_some(true)
}

/// The next call's paths off `q`: each once if `keep`, within `limit` and one command line.
fn take(
    q: &mut VecDeque<StorePath>,
    limit: usize,
    keep: impl Fn(&StorePath) -> bool,
) -> Vec<StorePath> {
    let (mut out, mut bytes, mut seen) = (Vec::new(), 0, HashSet::new());
    while let Some(p) = q.pop_front() {
        if !keep(&p) || !seen.insert(p.clone()) {
            continue;
        }
        let full = out.len() >= limit || bytes + p.as_str().len() >= MAX_ARG_BYTES;
        if full && !out.is_empty() {
            q.push_front(p);
            break;
        }
        bytes += p.as_str().len() + 1;
        out.push(p);
    }
    out
}

/// The thread that gathers batches and starts the lanes.
struct Front {
    ctx: Arc<Ctx>,
    nix: Nix,
    spool: Spool,
    ready: VecDeque<StorePath>,
    txs: Vec<Sender<ToLane>>,
    /// Derivations whose outputs could not be found yet.
    drvs: HashMap<StorePath, Backoff>,
}

/// Runs the worker for `config`'s targets until [`Msg::Shutdown`] or every sender is gone.
pub fn run(config: &Config, journal: Arc<Journal>, shared: Arc<Shared>, rx: Receiver<Msg>) {
    let targets = crate::target::configured(config);
    let uploads = targets.iter().any(|t| !matches!(t.kind, Kind::SignOnly));
    let ctx = Arc::new(Ctx {
        config: config.clone(),
        journal,
        shared,
        policy: Policy {
            max_attempts: config.max_attempts,
            give_up_after: config.give_up_after,
            retry_initial: config.retry_initial_delay,
            retry_max: config.retry_max_delay,
        },
        ids: targets.iter().map(|t| t.id).collect(),
        uploads,
        work: config.signing_key_file.is_some() || uploads,
        waits: Mutex::default(),
    });
    let mut front = Front {
        nix: Nix::from_config(config, None, ctx.shared.running(0)),
        spool: Spool::new(&config.spool_dir(), &config.store_dir),
        ready: VecDeque::new(),
        txs: Vec::new(),
        drvs: HashMap::new(),
        ctx,
    };
    // Builds come first; lanes and nix calls inherit the nice of their starter.
    if let Err(e) = nix::lower_priority() {
        warning!("cannot lower the worker's CPU priority: {e}");
    }
    if !front.ctx.work {
        info!("none of signing-key-file, upload-to and upload-command is set: paths are acknowledged and then dropped from the queue, nothing to do");
    }
    let mut threads = Vec::new();
    for (i, target) in targets.into_iter().enumerate() {
        let ctx = Arc::clone(&front.ctx);
        let url = match &target.kind {
            Kind::Url(url) => Some(url.as_str()),
            _ => None,
        };
        let lane = Lane {
            nix: Nix::from_config(&ctx.config, url, ctx.shared.running(i + 1)),
            to: match ctx.ids.len() {
                1 => String::new(),
                _ => format!(" {}", target.label),
            },
            limit: ctx.config.batch_size,
            ctx,
            i,
            target,
            down: None,
            streak: Streak::default(),
        };
        let (tx, rx) = mpsc::channel();
        front.txs.push(tx);
        let thread = std::thread::Builder::new().name(format!("lane {i}"));
        match thread.spawn(move || lane.run(rx)) {
            Ok(t) => threads.push(t),
            Err(e) => return error!("cannot start a thread for a target: {e}"),
        }
    }
    front.ingest_spool();
    loop {
        // Resolved or dropped meanwhile: no longer retried.
        let journal = &front.ctx.journal;
        front.drvs.retain(|p, _| journal.entry(p).is_some());
        // Now if paths are ready, else when a derivation is due.
        let next = front.ready.front().map(|_| Instant::now());
        let next = next.or(front.drvs.values().filter_map(|d| d.next_try).min());
        if receive(&rx, next, |m| front.handle(m)).is_none()
            || !front.gather(&rx)
            || front.ctx.shared.stopping.load(Ordering::SeqCst)
        {
            break;
        }
        let now = Some(Instant::now());
        let due = front.drvs.iter().filter(|d| d.1.next_try <= now);
        front.ready.extend(due.map(|d| d.0.clone()));
        if front.ready.is_empty() {
            front.ingest_spool();
        } else {
            let ctx = Arc::clone(&front.ctx);
            let batch = take(&mut front.ready, ctx.config.batch_size, |p| {
                ctx.needed(p, &ctx.ids)
            });
            front.process(batch);
        }
    }
    front.txs.clear();
    for t in threads {
        let _ = t.join();
    }
}

impl Front {
    /// Gathers a batch until it is quiet, full, old or a `wait` is pending. False on a stop.
    fn gather(&mut self, rx: &Receiver<Msg>) -> bool {
        let start = Instant::now();
        while !self.ready.is_empty()
            && self.ready.len() < self.ctx.config.batch_size
            && start.elapsed() < BATCH_MAX_WAIT
            && !self.ctx.wake(None)
        {
            match receive(rx, Some(Instant::now() + BATCH_QUIET), |m| self.handle(m)) {
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
            Msg::Flush(wait) => _ = self.ctx.wake(Some(wait)),
            Msg::Retry => {
                let due = |d: &mut Backoff| d.next_try = Some(Instant::now());
                self.drvs.values_mut().for_each(due);
                for tx in &self.txs {
                    let _ = tx.send(ToLane::Retry);
                }
            }
            Msg::Shutdown => return true,
        }
        false
    }

    /// Resolves, checks and signs a batch once, then hands it to the lanes.
    fn process(&mut self, batch: Vec<StorePath>) {
        let ctx = Arc::clone(&self.ctx);
        ctx.shared.lock().in_flight_paths.clone_from(&batch);
        let batch = self.resolve_derivations(batch);
        let batch = drop_gone(&ctx, &self.nix, batch);
        // If this fails, each lane signs what it copies: its bisection finds the culprits.
        let key = ctx.config.signing_key_file.as_ref();
        let key = key.filter(|_| ctx.uploads && !batch.is_empty());
        let signed = key.map(|key| self.nix.sign(key, ctx.config.sign_closure, &batch));
        if let Some(Err(e)) = &signed {
            ctx.shared.lock().failed_calls += 1;
            warning!("signing a batch of {} paths failed: {e}", batch.len());
        }
        let signed = matches!(signed, Some(Ok(())));
        for tx in self.txs.iter().filter(|_| !batch.is_empty()) {
            let _ = tx.send(ToLane::Batch(batch.clone(), signed));
        }
        ctx.shared.lock().in_flight_paths.clear();
    }

    /// Replaces derivations by their outputs, in the journal and the batch.
    fn resolve_derivations(&mut self, batch: Vec<StorePath>) -> Vec<StorePath> {
        let (drvs, mut out): (Vec<_>, Vec<_>) = batch.into_iter().partition(StorePath::is_drv);
        let mut gone = Vec::new();
        for path in drvs {
            let outputs = match drv::read_outputs(&path, &self.ctx.config.store_dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    gone.push(path);
                    continue;
                }
                Ok(Some(outputs)) => Ok(outputs),
                _ => self.query_outputs(&path),
            };
            match outputs.map(|o| self.ctx.journal.replace(&path, &o)) {
                Ok(Ok(added)) => out.extend(added),
                Ok(Err(e)) => {
                    let e = format!("cannot journal the outputs: {e}");
                    self.unresolved(path, &e, Blame::Target)
                }
                Err(e) => self.unresolved(path, &e, Blame::Paths),
            }
        }
        let why = "the derivation is no longer in the store";
        drop_paths(&self.ctx.journal, &self.ctx.shared, &gone, why);
        out
    }

    fn query_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, String> {
        let lines = self.nix.query_outputs(std::slice::from_ref(drv));
        let parse = |l: &String| {
            let path = StorePath::parse_output(l, &self.ctx.config.store_dir);
            path.map_err(|e| format!("nix-store printed {l:?}: {e}"))
        };
        let lines = lines.map_err(|e| e.to_string())?;
        lines.iter().map(parse).collect()
    }

    /// Backs off a derivation that could not be resolved, or gives up on it.
    fn unresolved(&mut self, path: StorePath, error: &str, blame: Blame) {
        let (now, mut d) = (Instant::now(), self.drvs.remove(&path).unwrap_or_default());
        d.attempts += 1;
        if let Some(why) = self.ctx.policy.fail(&mut d.failures, blame, now) {
            for i in 0..self.ctx.ids.len() {
                give_up(&self.ctx, i, &path, d.attempts, error);
            }
            return warning!("giving up on {path} after {why}: {error}");
        }
        let delay = self.ctx.policy.delay(d.attempts, random_unit());
        let (n, next) = (d.attempts, delay.as_secs_f64());
        warning!(
            "cannot find the outputs of {path} (attempt {n}, next try in {next:.1} s): {error}"
        );
        d.next_try = Some(now + delay);
        self.drvs.insert(path, d);
    }

    /// Queues what clients spooled, once some lane has no call in progress.
    fn ingest_spool(&mut self) {
        let idle = |t: &TargetStats| t.in_flight.is_empty();
        if self.ctx.shared.lock().targets.iter().any(idle) {
            self.ready.extend(self.spool.ingest(&self.ctx.journal));
        }
    }
}

/// Drops the paths of `batch` gone from the store; returns the others.
fn drop_gone(ctx: &Ctx, nix: &Nix, batch: Vec<StorePath>) -> Vec<StorePath> {
    let invalid = match ctx.work && !batch.is_empty() {
        true => nix.invalid_paths(&batch).unwrap_or_default(),
        false => return batch,
    };
    let gone = |p: &StorePath| invalid.iter().any(|i| i == p.as_str());
    let (gone, valid): (Vec<_>, Vec<_>) = batch.into_iter().partition(gone);
    let why = "no longer valid in the store (garbage-collected?)";
    drop_paths(&ctx.journal, &ctx.shared, &gone, why);
    valid
}

/// Journals that `path` is given up on for target `i`; false if that failed.
fn give_up(ctx: &Ctx, i: usize, path: &StorePath, attempts: u32, error: &str) -> bool {
    let record = GivenUp {
        target: ctx.ids[i],
        at: crate::journal::now_secs(),
        attempts,
        error: error.to_string(),
    };
    let given_up = ctx.journal.give_up(path, record);
    match &given_up {
        Ok(n) => ctx.shared.lock().targets[i].given_up += u64::from(*n),
        Err(e) => warning!("cannot journal that {path} is given up on ({e}); it is retried"),
    }
    given_up.is_ok()
}

/// One target's thread: its calls, canary, bisection and backoff.
struct Lane {
    ctx: Arc<Ctx>,
    i: usize,
    target: Target,
    nix: Nix,
    /// ` LABEL` when there are several targets, for log lines.
    to: String,
    /// Most paths in the next call (see [`policy::next_limit`]).
    limit: usize,
    /// While the target is down: its failed group, which new paths join.
    down: Option<Backoff>,
    streak: Streak<StorePath>,
}

impl Lane {
    /// Runs `f` on the paths this lane still needs, kept in [`Shared`].
    fn held<R>(&self, f: impl FnOnce(&mut HashMap<StorePath, Backoff>) -> R) -> R {
        f(&mut self.ctx.shared.lock().targets[self.i].backoff)
    }

    fn run(mut self, rx: Receiver<ToLane>) {
        loop {
            let now = Instant::now();
            // While the target is down, nothing is taken before it is due.
            self.down = self.down.take().filter(|d| d.next_try > Some(now));
            let next = match &self.down {
                Some(down) => down.next_try,
                None => self.held(|h| h.values().filter_map(|b| b.next_try).min()),
            };
            if receive(&rx, next, |m| self.handle(m)).is_none()
                || self.ctx.shared.stopping.load(Ordering::SeqCst)
            {
                return;
            }
            if self.down.is_none() {
                let batch = self.take(Instant::now());
                if !batch.is_empty() {
                    self.round(batch);
                }
            }
        }
    }

    /// Never a stop: a lane stops when the front drops its sender.
    fn handle(&mut self, msg: ToLane) -> bool {
        let now = Some(Instant::now());
        match msg {
            ToLane::Batch(paths, signed) => {
                // While the target is down, new paths join the failed group.
                let down = self.down.clone().filter(|d| d.next_try > now);
                let mut group = down.unwrap_or_default();
                (group.next_try, group.signed) = (group.next_try.or(now), signed);
                self.held(|held| {
                    for p in paths {
                        held.entry(p).or_insert(group.clone());
                    }
                });
            }
            ToLane::Retry => {
                self.down = None;
                let due = |b: &mut Backoff| b.next_try = b.next_try.and(now);
                self.held(|held| held.values_mut().for_each(due));
            }
        }
        false
    }

    /// The next call's paths: those due, in queue order, within the limit.
    fn take(&mut self, now: Instant) -> Vec<StorePath> {
        let (ctx, id) = (Arc::clone(&self.ctx), [self.target.id]);
        let limit = self.limit.min(ctx.config.batch_size);
        let (out, retries) = self.held(|held| {
            held.retain(|p, _| ctx.needed(p, &id));
            let due = held
                .iter()
                .filter(|h| h.1.next_try.is_some_and(|t| t <= now));
            let mut due: Vec<StorePath> = due.map(|h| h.0.clone()).collect();
            due.sort_by_key(|p| ctx.journal.entry(p).map_or(u64::MAX, |e| e.seq));
            let out = take(&mut due.into(), limit, |_| true);
            let mut retries = false;
            for p in &out {
                if let Some(b) = held.get_mut(p) {
                    b.next_try = None;
                    retries |= b.attempts > 0;
                }
            }
            (out, retries)
        });
        // Retried: gone from the store meanwhile?
        match retries {
            true => drop_gone(&ctx, &self.nix, out),
            false => out,
        }
    }

    /// Calls for `batch`: when one fails, the policy's canary, bisection, backoff.
    fn round(&mut self, batch: Vec<StorePath>) {
        let (len, max) = (batch.len(), self.ctx.config.batch_size);
        // Signed before each copy when the front could not sign some of them.
        let sign = self.held(|held| batch.iter().any(|p| held.get(p).is_some_and(|b| !b.signed)));
        let (mut groups, mut answer, mut budget, mut note) = (vec![batch], None, 0, None);
        let mut calls = 0;
        while let Some(mut group) = groups.pop() {
            // After the canary's call, unless that ended the round.
            if let Some(note) = note.take_if(|_| calls > 1) {
                warning!("{note}");
            }
            if calls > 0 && self.ctx.shared.stopping.load(Ordering::SeqCst) {
                return; // Still journaled: uploaded after the restart.
            }
            calls += 1;
            let started = Instant::now();
            let Err(f) = self.attempt(&group, sign) else {
                if calls == 1 {
                    self.limit = policy::next_limit(self.limit, len, false, max);
                }
                self.took(&group, started);
                answer = Some(Answer::TookSome);
                continue;
            };
            let next = policy::after_failure(group.len(), f.timed_out(), calls == 1, budget);
            let blame = match next {
                // Before a canary: a ping costs less than a copy.
                Next::Canary if *answer.get_or_insert_with(|| self.ask()) != Answer::Silent => {
                    let counted = |p| self.held(|h| h.get(p).map_or(0, |b| b.failures.counted));
                    let counted: Vec<u32> = group.iter().map(counted).collect();
                    let canary = group.remove(policy::pick_canary(&counted, random_unit()));
                    budget = policy::bisection_budget(group.len());
                    note = Some(format!("batch of {len} paths failed while the target{} works, splitting it to find the paths at fault: {f}", self.to));
                    groups.extend([group, vec![canary]]);
                    continue;
                }
                Next::Split => {
                    budget -= 1;
                    let right = group.split_off(group.len() / 2);
                    groups.extend([right, group]);
                    continue;
                }
                Next::Judge => {
                    // Asked once a round, unless a call of the round went through.
                    let a = *answer.get_or_insert_with(|| self.ask());
                    let refuses_all = a == Answer::Answers && self.streak.failed(group[0].clone());
                    if refuses_all {
                        let (n, to) = (policy::REFUSES_ALL, &self.to);
                        info!("{n} different paths failed alone while the target{to} answers and took none: it seems to refuse everything, which does not count against the paths");
                    }
                    policy::blame_alone(a, refuses_all)
                }
                Next::Outage if group.len() > 1 => {
                    self.limit = policy::next_limit(self.limit, group.len(), true, max);
                    let (n, to, limit) = (group.len(), &self.to, self.limit);
                    warning!(
                        "a batch of {n} paths timed out{to}; the next batches take at most {limit}"
                    );
                    Blame::Target
                }
                Next::Outage | Next::Canary | Next::BackOff => Blame::Target,
            };
            if blame == Blame::Target && next != Next::BackOff {
                // An outage: the rest of the round waits with it.
                group.extend(groups.drain(..).flatten());
            }
            self.back_off(group, &f, blame);
        }
    }

    fn ask(&self) -> Answer {
        let url = match &self.target.kind {
            Kind::Command(_) => return Answer::Unknown,
            Kind::SignOnly => return Answer::Answers,
            Kind::Url(url) => url,
        };
        let timeout = nix::PING_TIMEOUT.min(self.ctx.config.command_timeout);
        let Err(e) = self.nix.ping(url, timeout) else {
            return Answer::Answers;
        };
        self.count_failure(&e);
        info!("the target{} does not answer either, so the failure does not count against the path: {e}", self.to);
        Answer::Silent
    }

    /// Copies the paths (signing them first if the round must).
    fn attempt(&self, paths: &[StorePath], sign: bool) -> Result<(), Failure> {
        self.ctx.shared.lock().targets[self.i].in_flight = paths.to_vec();
        let result = match (&self.ctx.config.signing_key_file, sign) {
            (Some(key), true) => self.nix.sign(key, self.ctx.config.sign_closure, paths),
            _ => Ok(()),
        };
        let result = result.and_then(|()| match &self.target.kind {
            Kind::Url(url) => self.nix.copy(url, paths),
            Kind::Command(argv) => self.nix.run_uploader(argv, paths),
            Kind::SignOnly => Ok(()),
        });
        self.ctx.shared.lock().targets[self.i].in_flight.clear();
        result.inspect_err(|f| self.count_failure(f))
    }

    fn count_failure(&self, failure: &Failure) {
        let t = &mut self.ctx.shared.lock().targets[self.i];
        t.failed_calls += 1;
        t.last_error = Some(failure.to_string());
    }

    /// Records that the target has the paths; those all targets have leave.
    fn took(&mut self, paths: &[StorePath], started: Instant) {
        let (ctx, took) = (Arc::clone(&self.ctx), started.elapsed().as_secs_f64());
        self.down = None;
        self.streak.took();
        let done = ctx.journal.deliver(paths, self.target.id, &ctx.ids);
        let done = done.unwrap_or_else(|e| {
            // After a restart they are uploaded once more, which is harmless.
            warning!("cannot journal {} finished paths: {e}", paths.len());
            Vec::new()
        });
        if ctx.work {
            let (n, names, to) = (paths.len(), names(paths), &self.to);
            info!("uploaded {n} path(s) ({names}){to} in {took:.3} s");
        }
        let mut stats = ctx.shared.lock();
        let t = &mut stats.targets[self.i];
        for p in paths {
            t.backoff.remove(p);
        }
        t.delivered += paths.len() as u64;
        t.last_error = None;
        stats.record_uploads(done.len() as u64);
        if ctx.work {
            stats.upload_seconds += took;
            stats.upload_batches += 1;
        }
        done.iter().for_each(|p| stats.forget(p));
        ctx.wake(None);
    }

    /// Backs off paths that failed together as one group, or gives up on them.
    fn back_off(&mut self, paths: Vec<StorePath>, error: &Failure, blame: Blame) {
        let (now, to) = (Instant::now(), &self.to);
        let old = |p| self.held(|h| h.get(p).map_or(0, |b: &Backoff| b.attempts));
        let attempts = 1 + paths.iter().map(old).max().unwrap_or(0);
        let delay = self.ctx.policy.delay(attempts, random_unit());
        let (next_try, last_error) = (Some(now + delay), error.to_string());
        let group = Backoff {
            attempts,
            next_try,
            last_error,
            ..Backoff::default()
        };
        let mut kept = Vec::new();
        for p in paths {
            let mut b = self.held(|held| held.remove(&p)).unwrap_or_default();
            (b.attempts, b.next_try, b.last_error) = (attempts, next_try, group.last_error.clone());
            match self.ctx.policy.fail(&mut b.failures, blame, now) {
                Some(why) if give_up(&self.ctx, self.i, &p, attempts, &group.last_error) => {
                    let (on, e) = (to.replacen(' ', " for ", 1), &group.last_error);
                    warning!("giving up on {p}{on} after {why}: {e}; it stays in the journal, not tried again until `post-build-hook-queue requeue {p}` (or `drop {p}`)");
                }
                _ => kept.push((p, b)),
            }
        }
        if !kept.is_empty() {
            let (n, names) = (kept.len(), names(kept.iter().map(|k| &k.0)));
            let (next, e) = (delay.as_secs_f64(), &group.last_error);
            warning!(
                "{n} path(s) ({names}) failed attempt {attempts}{to}, next try in {next:.1} s: {e}"
            );
        }
        let journal = &self.ctx.journal;
        self.held(|held| held.extend(kept.into_iter().filter(|k| journal.entry(&k.0).is_some())));
        if blame == Blame::Target {
            self.down = Some(group);
        }
    }
}

/// Drops queued paths (gone from the store, or `drop`) with one warning; returns how many.
pub fn drop_paths(journal: &Journal, shared: &Shared, paths: &[StorePath], why: &str) -> usize {
    let queued = paths.iter().filter(|p| journal.entry(p).is_some());
    let paths: Vec<StorePath> = queued.cloned().collect();
    let count = match paths.len() {
        0 => return 0,
        1 => String::new(),
        n => format!(" ({n} paths)"),
    };
    warning!("dropping {}{count}: {why}", names(&paths));
    let mut stats = shared.lock();
    paths.iter().for_each(|p| stats.forget(p));
    stats.dropped += paths.len() as u64;
    drop(stats);
    journal.drop_paths(&paths).len()
}

/// The first few of `paths`, for a log line: `A, B, C, ...`.
fn names<'a>(paths: impl IntoIterator<Item = &'a StorePath>) -> String {
    let mut paths = paths.into_iter();
    let named: Vec<String> = paths.by_ref().take(3).map(StorePath::to_string).collect();
    named.join(", ") + if paths.next().is_some() { ", ..." } else { "" }
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
        let config = Config {
            batch_size: 10,
            store_dir: STORE.into(),
            ..Config::default()
        };
        let ctx = Ctx {
            config,
            journal: Arc::new(journal),
            shared: Arc::new(Shared::new(&[Target::sign_only()])),
            policy,
            ids: Vec::new(),
            uploads: false,
            work: false,
            waits: Mutex::default(),
        };
        let mut front = Front {
            ctx: Arc::new(ctx),
            nix: Nix::new(std::path::Path::new("nix"), Duration::from_secs(1), None),
            spool: Spool::new(&dir.join("spool"), STORE),
            ready: VecDeque::from([path("a")]),
            txs: Vec::new(),
            drvs: HashMap::new(),
        };
        let (tx, rx) = mpsc::channel();
        // Without a wait, a path that comes within the quiet period joins.
        tx.send(Msg::Queued(vec![path("b")])).unwrap();
        assert!(front.gather(&rx));
        assert_eq!(front.ready.len(), 2);
        // With one, the batch starts as it is.
        let (wait, woken) = mpsc::channel();
        assert!(!front.handle(Msg::Flush(wait)));
        tx.send(Msg::Queued(vec![path("c")])).unwrap();
        assert!(front.gather(&rx));
        assert_eq!(front.ready.len(), 2);
        assert!(matches!(rx.try_recv(), Ok(Msg::Queued(_))));
        // It is woken as paths settle, while it waits.
        while woken.try_recv().is_ok() {}
        assert!(front.ctx.wake(None));
        assert_eq!(woken.try_recv(), Ok(()));
        // Once it is answered, paths gather with the quiet period again.
        drop(woken);
        tx.send(Msg::Queued(vec![path("d")])).unwrap();
        assert!(front.gather(&rx));
        assert_eq!(front.ready.len(), 3);
        assert!(!front.ctx.wake(None));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let xs: Vec<f64> = (0..100).map(|_| random_unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.iter().any(|x| (x - xs[0]).abs() > 1e-9));
    }
}
