//! The benchmark: is the hook fast where Nix waits, and is the daemon cheap
//! everywhere else? (issue 6)
//!
//! `cargo bench` runs it in full (a few minutes); `cargo test` runs a quick
//! mode (a handful of iterations, well under a minute) so it cannot rot. It
//! is one target, `[[test]] name = "bench"` with `harness = false` and
//! `bench = true` in Cargo.toml: `cargo bench` passes `--bench`, which
//! selects the full mode. Both start the real binaries cargo built for the
//! run (release under `cargo bench`) and real Nix in private stores, and
//! print one Markdown table: each figure's median over repeated runs, its
//! spread, its target and PASS/MISS, comparisons as same-run ratios.
//!
//! The quick mode asserts that every measurement ran, produced a number and
//! did what it claims (acks, uploads, spool files), never a time: the
//! targets are judged only by reading the full table.
//!
//! `NPBHQ_BENCH_FIGURES=1,3` runs only some figures (for profiling).

#[path = "../common/mod.rs"]
mod common;

mod build;
mod daemon;
mod drain;
mod floor;
mod hook;
mod size;
mod stats;
mod util;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use stats::Row;
use util::Mode;

/// The name `cargo test FILTER` is matched against.
const TEST_NAME: &str = "bench_quick";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !full && !filters.is_empty() && !filters.iter().any(|f| TEST_NAME.contains(f.as_str())) {
        println!("{TEST_NAME}: filtered out");
        return;
    }
    let only: Option<Vec<u32>> = std::env::var("NPBHQ_BENCH_FIGURES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let want = |fig: u32| only.as_ref().is_none_or(|o| o.contains(&fig));
    let mode = Mode::new(!full);
    // The quick mode (under `cargo test`) prints only its verdict, unless
    // asked for the table with `cargo test -- --nocapture`.
    let verbose = full || args.iter().any(|a| a == "--nocapture");

    let started = Instant::now();
    let load_before = loadavg();
    let floor = floor::FloorProgram::build();
    let mut by_figure: Vec<(u32, Vec<Row>)> = Vec::new();
    let step = |fig: u32, what: &str| {
        if !verbose {
            return;
        }
        eprintln!(
            "bench: figure {fig}: {what} ({:.0} s so far)",
            started.elapsed().as_secs_f64()
        );
    };
    if want(1) || want(4) {
        step(1, "hook latency, and 4: burst");
        let (h, b) = hook::run(&mode, &floor);
        by_figure.push((1, h));
        by_figure.push((4, b));
    }
    if want(2) {
        step(2, "build-loop overhead");
        by_figure.push((2, build::run(&mode)));
    }
    if want(3) {
        step(3, "drain throughput");
        by_figure.push((3, drain::run(&mode)));
    }
    if want(5) {
        step(5, "enqueue throughput");
        by_figure.push((5, daemon::enqueue(&mode)));
    }
    if want(6) || want(7) {
        step(6, "memory, and 7: restart");
        let (m, r) = daemon::memory_and_restart(&mode, &floor);
        by_figure.push((6, m));
        by_figure.push((7, r));
    }
    if want(8) {
        step(8, "size");
        by_figure.push((8, size::run_figure(&floor)));
    }
    by_figure.sort_by_key(|(f, _)| *f);
    let rows: Vec<Row> = by_figure.into_iter().flat_map(|(_, r)| r).collect();

    util::delete_kept();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    out.push('\n');
    out.push_str(&format!(
        "nix-post-build-hook-queue benchmark, {} mode, {}: {cores} cores, {}, load average {} before, {} after, {:.0} s",
        if full { "full" } else { "quick" },
        today(),
        nix_version(),
        load_before,
        loadavg(),
        started.elapsed().as_secs_f64()
    ));
    out.push_str("\n\n");
    out.push_str(&stats::table(&rows));
    let missed = rows.iter().filter(|r| r.pass() == Some(false)).count();
    out.push_str(&format!(
        "\n{} of {} targets met\n",
        rows.iter().filter(|r| r.pass() == Some(true)).count(),
        rows.iter().filter(|r| r.pass().is_some()).count()
    ));
    if verbose {
        print!("{out}");
    }
    if mode.quick {
        // The quick mode proves that every measurement ran and produced a
        // number; its timings (debug binaries, few runs) judge nothing.
        let bad: Vec<&str> = rows
            .iter()
            .filter(|r| !r.value.is_finite())
            .map(|r| r.name.as_str())
            .collect();
        assert!(bad.is_empty(), "figures without a number: {bad:?}");
        if only.is_none() {
            // 25, and the bare floor 1i where it can be built.
            let expected = 25 + usize::from(floor.bare.is_some());
            assert_eq!(rows.len(), expected, "every figure produced its rows");
        }
        println!(
            "{TEST_NAME}: ok, {} figures measured in {:.0} s (quick mode: no target is judged; \
             the table: cargo test --test bench -- --nocapture)",
            rows.len(),
            started.elapsed().as_secs_f64()
        );
    } else if missed > 0 {
        println!("{missed} target(s) missed: see the notes on each row");
    }
}

/// The first number of /proc/loadavg.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// `nix --version`.
fn nix_version() -> String {
    std::process::Command::new("nix")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("nix not runnable: {e}"))
}

/// Today's date (UTC) as YYYY-MM-DD, from the days since the epoch.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
