//! The retry policy after a failed upload call, without I/O, threads or clock
//! reads (time and randomness are arguments), so each decision has a unit test.

use std::collections::HashSet;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Different paths failing alone in a row, target answering, after which it refuses everything.
pub const REFUSES_ALL: usize = 4;

/// Whose fault a failed call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The paths': counts towards `max-attempts` and `give-up-after`.
    Paths,
    /// The target's, or unknown: counts towards nothing.
    Target,
}

/// What a lone failure is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Another call of this round went through: the target works.
    TookSome,
    /// `nix store ping` went through (or there is no target to ask).
    Answers,
    /// `nix store ping` failed too.
    Silent,
    /// The target cannot be asked (an `upload-command`).
    Unknown,
}

/// Whom to blame for a path that failed alone; `refuses_all` from [`Streak`].
pub fn blame_alone(answer: Answer, refuses_all: bool) -> Blame {
    match answer {
        Answer::TookSome => Blame::Paths,
        Answer::Answers if !refuses_all => Blame::Paths,
        _ => Blame::Target,
    }
}

/// What follows a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The target hangs: back off the round's paths, blamed on the target.
    Outage,
    /// Judge the one path ([`blame_alone`]).
    Judge,
    /// The round's first call: one path alone, then bisect the rest.
    Canary,
    /// Split the paths in halves.
    Split,
    /// The budget is spent: back off the paths, blamed on the target.
    BackOff,
}

/// The step after a failed call of `len` paths (`first` of the round, `budget` splits left).
pub fn after_failure(len: usize, timed_out: bool, first: bool, budget: u32) -> Next {
    match (timed_out, len, first) {
        (true, _, _) => Next::Outage,
        (_, 1, _) => Next::Judge,
        (_, _, true) => Next::Canary,
        _ if budget > 0 => Next::Split,
        _ => Next::BackOff,
    }
}

/// The canary: one of the paths with the fewest counted failures, picked by `jitter` in [0, 1).
pub fn pick_canary(counted: &[u32], jitter: f64) -> usize {
    let fewest = counted.iter().copied().min().unwrap_or(0);
    let candidates: Vec<usize> = (0..counted.len())
        .filter(|&i| counted[i] == fewest)
        .collect();
    let pick = candidates.get((jitter * candidates.len() as f64) as usize);
    pick.or(candidates.last()).copied().unwrap_or(0)
}

/// Splits a bisection may make for `len` paths: enough to find one bad path, plus a little.
pub fn bisection_budget(len: usize) -> u32 {
    2 * (usize::BITS - len.leading_zeros()) + 2
}

/// The batch limit after a call of `len` paths: halved after a timeout, doubled after a success.
pub fn next_limit(limit: usize, len: usize, timed_out: bool, max: usize) -> usize {
    if timed_out {
        (len / 2).max(1).min(limit)
    } else {
        limit.saturating_mul(2).clamp(1, max)
    }
}

/// Different paths that failed alone in a row while the target answered; a success ends it.
#[derive(Debug)]
pub struct Streak<P>(HashSet<P>);

impl<P: Hash + Eq> Default for Streak<P> {
    fn default() -> Self {
        Streak(HashSet::new())
    }
}

impl<P: Hash + Eq> Streak<P> {
    /// The target took a path.
    pub fn took(&mut self) {
        self.0.clear();
    }

    /// `path` failed alone while the target answered; true once it seems to refuse everything.
    pub fn failed(&mut self, path: P) -> bool {
        self.0.insert(path);
        self.0.len() >= REFUSES_ALL
    }
}

/// The settings the decisions follow.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Failures blamed on a path after which it is given up on.
    pub max_attempts: Option<u32>,
    /// How long a path may fail by its own fault (from the first such failure this run).
    pub give_up_after: Option<Duration>,
    /// The first retry's delay.
    pub retry_initial: Duration,
    /// The longest delay.
    pub retry_max: Duration,
}

/// One path's failures blamed on it, on one target in this run, and when the first was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failures {
    /// Those blamed on the path.
    pub counted: u32,
    /// When the first of those was.
    pub since: Option<Instant>,
}

impl Policy {
    /// Records a failure at `now`; returns why the path is given up on (only for its own fault).
    pub fn fail(&self, f: &mut Failures, blame: Blame, now: Instant) -> Option<String> {
        if blame == Blame::Target {
            return None;
        }
        f.counted += 1;
        let since = *f.since.get_or_insert(now);
        if self.max_attempts.is_some_and(|max| f.counted >= max) {
            return Some(format!(
                "{} failed attempts while the target answered",
                f.counted
            ));
        }
        let failing = now.saturating_duration_since(since);
        match self.give_up_after {
            Some(limit) if failing >= limit => Some(format!(
                "failing for {} s while the target answered (give-up-after)",
                failing.as_secs()
            )),
            _ => None,
        }
    }

    /// The delay before attempt `attempts + 1`: half to all of `initial * 2^(attempts-1)`, capped.
    pub fn delay(&self, attempts: u32, jitter: f64) -> Duration {
        let factor = 2f64.powi(attempts.saturating_sub(1).min(40) as i32);
        let max = self.retry_max.max(self.retry_initial).as_secs_f64();
        let full = (self.retry_initial.as_secs_f64() * factor).min(max);
        Duration::from_secs_f64(full * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: Option<u32>, after: Option<u64>) -> Policy {
        Policy {
            max_attempts: max,
            give_up_after: after.map(Duration::from_secs),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_lone_failure_is_the_paths_only_while_the_target_works() {
        assert_eq!(blame_alone(Answer::TookSome, false), Blame::Paths);
        assert_eq!(blame_alone(Answer::TookSome, true), Blame::Paths);
        assert_eq!(blame_alone(Answer::Answers, false), Blame::Paths);
        assert_eq!(blame_alone(Answer::Answers, true), Blame::Target);
        assert_eq!(blame_alone(Answer::Silent, false), Blame::Target);
        assert_eq!(blame_alone(Answer::Unknown, false), Blame::Target);
    }

    #[test]
    fn a_timeout_is_never_bisected_one_path_is_judged_and_a_batch_gets_a_canary() {
        assert_eq!(after_failure(5, true, true, 0), Next::Outage);
        assert_eq!(after_failure(5, true, false, 3), Next::Outage);
        assert_eq!(after_failure(1, true, true, 0), Next::Outage);
        assert_eq!(after_failure(1, false, true, 0), Next::Judge);
        assert_eq!(after_failure(1, false, false, 0), Next::Judge);
        assert_eq!(after_failure(2, false, true, 0), Next::Canary);
        assert_eq!(after_failure(4, false, false, 1), Next::Split);
        assert_eq!(after_failure(4, false, false, 0), Next::BackOff);
    }

    #[test]
    fn the_canary_has_the_fewest_counted_failures_and_varies() {
        assert_eq!(pick_canary(&[2, 0, 1], 0.99), 1);
        assert_eq!(pick_canary(&[1, 0, 0], 0.0), 1);
        assert_eq!(pick_canary(&[1, 0, 0], 0.99), 2);
        assert_eq!(pick_canary(&[0], 0.5), 0);
        assert_eq!(pick_canary(&[], 0.5), 0);
    }

    #[test]
    fn bisection_budget_grows_with_the_log_of_the_batch() {
        assert_eq!(bisection_budget(1), 4);
        assert_eq!(bisection_budget(2), 6);
        assert_eq!(bisection_budget(1000), 22);
    }

    #[test]
    fn a_timeout_halves_the_batch_limit_and_a_success_doubles_it() {
        assert_eq!(next_limit(1000, 1000, true, 1000), 500);
        assert_eq!(next_limit(500, 1, true, 1000), 1);
        assert_eq!(next_limit(1, 1, false, 1000), 2);
        assert_eq!(next_limit(600, 600, false, 1000), 1000);
    }

    #[test]
    fn a_streak_of_different_lone_failures_blames_the_target_until_it_takes_one() {
        let mut s = Streak::default();
        assert!(!s.failed("a"));
        assert!(!s.failed("a"), "the same path twice is one");
        assert!(!s.failed("b"));
        assert!(!s.failed("c"));
        assert!(s.failed("d"));
        s.took();
        assert!(!s.failed("d"));
    }

    #[test]
    fn max_attempts_counts_only_failures_blamed_on_the_path() {
        let p = policy(Some(2), None);
        let now = Instant::now();
        let mut f = Failures::default();
        for _ in 1..=100 {
            assert_eq!(p.fail(&mut f, Blame::Target, now), None);
        }
        assert_eq!(f.counted, 0);
        assert_eq!(p.fail(&mut f, Blame::Paths, now), None);
        let why = p.fail(&mut f, Blame::Paths, now).unwrap();
        assert!(why.starts_with("2 failed attempts"), "{why}");
        assert_eq!(f.counted, 2);
        let mut f = Failures::default();
        assert!(policy(Some(1), None)
            .fail(&mut f, Blame::Paths, now)
            .is_some());
        let mut f = Failures::default();
        for _ in 1..=1000 {
            assert_eq!(policy(None, None).fail(&mut f, Blame::Paths, now), None);
        }
    }

    #[test]
    fn give_up_after_runs_from_the_first_failure_blamed_on_the_path() {
        let p = policy(None, Some(100));
        let start = Instant::now();
        let mut f = Failures::default();
        // A long outage first: not counted, no clock started.
        let later = start + Duration::from_secs(10_000);
        assert_eq!(p.fail(&mut f, Blame::Target, later), None);
        assert_eq!(f.since, None);
        assert_eq!(p.fail(&mut f, Blame::Paths, later), None);
        assert_eq!(f.since, Some(later));
        let outage = later + Duration::from_secs(500);
        assert_eq!(
            p.fail(&mut f, Blame::Target, outage),
            None,
            "an outage never ends it"
        );
        let why = p
            .fail(&mut f, Blame::Paths, later + Duration::from_secs(100))
            .unwrap();
        assert!(why.contains("give-up-after"), "{why}");
        let mut f = Failures::default();
        assert!(policy(None, Some(0))
            .fail(&mut f, Blame::Paths, start)
            .is_some());
    }

    #[test]
    fn delays_grow_exponentially_within_jitter_and_cap() {
        let p = policy(None, None);
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(p.delay(1, 1.0), Duration::from_secs(1));
        assert_eq!(p.delay(3, 1.0), Duration::from_secs(4));
        assert_eq!(p.delay(3, 0.5), Duration::from_secs(3));
        assert_eq!(p.delay(30, 1.0), Duration::from_secs(60));
        assert_eq!(p.delay(u32::MAX, 0.0), Duration::from_secs(30));
    }
}
