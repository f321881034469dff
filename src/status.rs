//! What the daemon knows about its own progress, shared by the worker (which
//! updates it) and the connection threads (which report it).
//!
//! The queue itself lives in the journal; this holds the counters since start
//! and the paths that are backing off after failures.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::store_path::StorePath;

/// Dropped paths remembered for `wait` (older ones are forgotten).
const RECENT_DROPS: usize = 10_000;

/// A path whose last attempt failed.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Failed attempts so far (since the daemon started).
    pub attempts: u32,
    /// When it is tried again.
    pub next_try: Instant,
    /// What went wrong the last time, on one line.
    pub last_error: String,
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
    /// nix calls that failed.
    pub failed_calls: u64,
    /// Paths in the batch the worker is working on now.
    pub in_flight: usize,
    /// Seconds spent in successful upload batches, and their number.
    pub upload_seconds: f64,
    /// Number of successful upload batches.
    pub upload_batches: u64,
    /// Paths backing off after a failure.
    pub backoff: HashMap<StorePath, Backoff>,
    /// Sequence numbers of recently dropped paths, oldest first.
    pub recent_drops: VecDeque<u64>,
}

impl Stats {
    /// Records that a path with this sequence number was dropped.
    pub fn record_drop(&mut self, seq: Option<u64>) {
        self.dropped += 1;
        if let Some(seq) = seq {
            self.recent_drops.push_back(seq);
            if self.recent_drops.len() > RECENT_DROPS {
                self.recent_drops.pop_front();
            }
        }
    }

    /// How many remembered drops had a sequence number of at most `seq`.
    pub fn drops_up_to(&self, seq: u64) -> usize {
        self.recent_drops.iter().filter(|&&s| s <= seq).count()
    }
}

/// The shared, lockable statistics.
pub struct Shared(Mutex<Stats>);

impl Shared {
    /// Fresh statistics, starting now.
    pub fn new() -> Shared {
        Shared(Mutex::new(Stats {
            started: Instant::now(),
            uploaded: 0,
            dropped: 0,
            failed_calls: 0,
            in_flight: 0,
            upload_seconds: 0.0,
            upload_batches: 0,
            backoff: HashMap::new(),
            recent_drops: VecDeque::new(),
        }))
    }

    /// Locks the statistics; a poisoned lock still holds usable counters.
    pub fn lock(&self) -> MutexGuard<'_, Stats> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

/// Seconds until `when`, or 0 when it has passed.
pub fn seconds_until(when: Instant) -> f64 {
    when.saturating_duration_since(Instant::now()).as_secs_f64()
}
