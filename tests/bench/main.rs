//! The benchmark, in figures users feel: does the hook slow a build loop
//! down, and is the daemon cheap? Its targets: a loop of `nix-build`s with
//! our hook at most 1.10x the same loop with `/bin/true` as the hook, the
//! idle daemon at most 1 MiB above a std program that sleeps, the daemon's
//! drain, batching, burst, enqueue, memory and restart figures, and what
//! one piece of work costs the others (a hung target, a compaction, a full
//! spool, `build && wait`). The hook's own cost and the binaries' size are
//! information, beside the same run's floors.
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
mod contention;
mod daemon;
mod drain;
mod floor;
mod hook;
mod size;
mod stats;
mod util;

use std::time::Instant;

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
    // The binaries' profile: cargo bench builds them with release's.
    let floor = floor::FloorProgram::build(if full { "release" } else { "dev" });
    let mut by_figure: Vec<(u32, Vec<Row>)> = Vec::new();
    let step = |fig: u32, what: &str| {
        let so_far = started.elapsed().as_secs_f64();
        if verbose {
            eprintln!("bench: figure {fig}: {what} ({so_far:.0} s so far)");
        }
    };
    if want(1) || want(4) {
        step(1, "the hook's own cost, and 4: burst");
        let (h, b) = hook::run(&mode, &floor);
        by_figure.extend([(1, h), (4, b)]);
    }
    if want(2) {
        step(2, "the build loop");
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
        by_figure.extend([(6, m), (7, r)]);
    }
    if want(8) {
        step(8, "size");
        by_figure.push((8, size::run_figure(&floor)));
    }
    if want(9) {
        step(
            9,
            "contention: a hung target, compaction, spool, build && wait",
        );
        by_figure.push((9, contention::run(&mode)));
    }
    by_figure.sort_by_key(|(f, _)| *f);
    let rows: Vec<Row> = by_figure.into_iter().flat_map(|(_, r)| r).collect();

    util::delete_kept();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = format!(
        "\nnix-post-build-hook-queue benchmark, {} mode, {}: {cores} cores, {}, load average {} before, {} after, {:.0} s\n\n{}",
        if full { "full" } else { "quick" },
        output_of("date", &["-u", "+%F"]),
        output_of("nix", &["--version"]),
        load_before,
        loadavg(),
        started.elapsed().as_secs_f64(),
        stats::table(&rows)
    );
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
            assert_eq!(rows.len(), 26, "every figure produced its rows");
        }
        // The statistics that 2a's verdict rests on: for 25 samples, the
        // median's 95% interval runs from the 8th to the 18th.
        let mut s = stats::Samples::new();
        (1..=25).for_each(|x| s.push(f64::from(x)));
        assert_eq!(s.median_ci(), Some((8.0, 18.0)), "median_ci of 1..=25");
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

/// What `program args` prints, trimmed (or why it could not run): the
/// header's `nix --version` and date.
fn output_of(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("{program} not runnable: {e}"))
}
