//! Samples, percentiles and the result table of the benchmark.
//!
//! Every figure is a [`Row`]: a median over repeated runs, a spread, a target
//! and whether the median (or the stated statistic) meets it. Rows without a
//! target are context (baselines, bounds) and show `info`.

use std::fmt::Write as _;

/// Measurements of one quantity, in the unit the row prints.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn new() -> Samples {
        Samples(Vec::new())
    }

    pub fn push(&mut self, x: f64) {
        self.0.push(x);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p`-th percentile (0..=100), nearest-rank on the sorted samples;
    /// NaN when empty.
    pub fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let v = self.sorted();
        let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[rank.min(v.len() - 1)]
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    pub fn median(&self) -> f64 {
        self.pct(50.0)
    }

    pub fn max(&self) -> f64 {
        self.pct(100.0)
    }

    /// p10-p90 (or min-max when there are fewer than 10 samples) and the
    /// count, e.g. `p10-p90 0.21-0.30 ms (n=1000)`.
    pub fn spread(&self, unit: &str) -> String {
        let (label, lo, hi) = if self.len() >= 10 {
            ("p10-p90", self.pct(10.0), self.pct(90.0))
        } else {
            ("min-max", self.pct(0.0), self.max())
        };
        let (lo, hi, n) = (num(lo, ""), num(hi, unit), self.len());
        format!("{label} {lo}-{hi} (n={n})")
    }

    /// A 95% confidence interval of the median that assumes nothing about
    /// the distribution: the k-th smallest and k-th largest sample, k the
    /// largest rank that a binomial(n, 1/2) count falls below with
    /// probability at most 2.5%. `None` below 6 samples (too few for any).
    pub fn median_ci(&self) -> Option<(f64, f64)> {
        let n = self.0.len();
        // P(count < k) for k = 0, 1, ...: C(n, i) / 2^n summed over i < k.
        let (mut k, mut below, mut term) = (0, 0.0, 0.5f64.powi(n as i32));
        while below + term <= 0.025 {
            below += term;
            term *= (n - k) as f64 / (k + 1) as f64;
            k += 1;
        }
        if k == 0 {
            return None;
        }
        let v = self.sorted();
        Some((v[k - 1], v[n - k]))
    }
}

/// Which way a target goes.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// The value must be at most the bound.
    AtMost(f64),
    /// The value must be at least the bound.
    AtLeast(f64),
    /// No target: the row is context.
    Info,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Figure number and name, e.g. `1a hook, 1 path, above /bin/true`.
    pub name: String,
    /// The value compared with the target (usually the median).
    pub value: f64,
    /// How the spread is shown, e.g. `p10-p90 0.21-0.30`.
    pub spread: String,
    /// Unit printed after numbers (`ms`, `paths/s`, `x`, `MiB`, ...).
    pub unit: &'static str,
    pub goal: Goal,
    /// Free text shown after the verdict (what was measured, the bound).
    pub note: String,
}

impl Row {
    /// A row whose value is the median of `s` and whose spread is
    /// [`Samples::spread`].
    pub fn from_samples(name: &str, s: &Samples, unit: &'static str, goal: Goal) -> Row {
        Row::single(name, s.median(), &s.spread(unit), unit, goal)
    }

    /// The row of [`Row::from_samples`], its spread led by the median's 95%
    /// confidence interval ([`Samples::median_ci`]): for figures judged on
    /// a median, whether enough rounds ran for it to be stable.
    pub fn from_samples_ci(name: &str, s: &Samples, unit: &'static str, goal: Goal) -> Row {
        let mut row = Row::from_samples(name, s, unit, goal);
        if let Some((lo, hi)) = s.median_ci() {
            let (lo, hi) = (num(lo, ""), num(hi, unit));
            row.spread = format!("median 95% CI {lo}-{hi}, {}", row.spread);
        }
        row
    }

    /// A row with a single value (and a free-form spread text).
    pub fn single(name: &str, value: f64, spread: &str, unit: &'static str, goal: Goal) -> Row {
        Row {
            name: name.to_string(),
            value,
            spread: spread.to_string(),
            unit,
            goal,
            note: String::new(),
        }
    }

    /// Adds an explanation shown after the verdict.
    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    /// `Some(true)` when the target is met, `None` for context rows.
    pub fn pass(&self) -> Option<bool> {
        match self.goal {
            Goal::AtMost(b) => Some(self.value <= b),
            Goal::AtLeast(b) => Some(self.value >= b),
            Goal::Info => None,
        }
    }

    fn target_text(&self) -> String {
        match self.goal {
            Goal::AtMost(b) => format!("<= {}", num(b, self.unit)),
            Goal::AtLeast(b) => format!(">= {}", num(b, self.unit)),
            Goal::Info => "-".into(),
        }
    }
}

/// A number with as many decimals as its size deserves, and its unit.
pub fn num(x: f64, unit: &str) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    let a = x.abs();
    let s = if a >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    };
    if unit.is_empty() {
        s
    } else if unit == "x" || unit == "%" {
        format!("{s}{unit}")
    } else {
        format!("{s} {unit}")
    }
}

/// The table as Markdown (also readable as plain text).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| figure | median | spread | target | result |\n");
    out.push_str("| --- | ---: | --- | --- | --- |\n");
    for r in rows {
        let verdict = match r.pass() {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "info",
        };
        let note = match r.note.as_str() {
            "" => String::new(),
            note => format!(" ({note})"),
        };
        writeln!(
            out,
            "| {} | {} | {} | {} | {verdict}{note} |",
            r.name,
            num(r.value, r.unit),
            r.spread,
            r.target_text()
        )
        .unwrap();
    }
    out
}
