//! Figure 3: drain throughput. Real store paths (`nix-store --add`) queued in
//! one request to a daemon that signs them and uploads them to a fresh
//! `file://` cache with its default compression (xz); the time runs from the
//! request until nothing is queued or in flight. Same rounds: the default
//! `batch-size`, `batch-size = 1` (one nix call per path), and bare nix
//! (`nix store sign` + `nix copy` of all paths in one call each, no daemon):
//! the bound that nix itself sets.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{run_ok, Daemon, NixEnv};
use crate::stats::{Goal, Row, Samples};
use crate::util::{add_store_paths, keep_until_the_end, wait_drained, Conn, Mode};

/// Correctness bound for one drain.
const DRAIN_BOUND: Duration = Duration::from_secs(600);

fn narinfos(cache: &Path) -> usize {
    let files = fs::read_dir(cache).into_iter().flatten().flatten();
    let is_narinfo = |e: &fs::DirEntry| e.file_name().to_string_lossy().ends_with(".narinfo");
    files.filter(is_narinfo).count()
}

/// Queues `paths` on a fresh daemon and returns paths per second.
fn drain_with(env: &NixEnv, sk: &Path, cache: &Path, paths: &[String], batch: Option<&str>) -> f64 {
    let url = format!("file://{}", cache.display());
    let sk = sk.display().to_string();
    let mut cfg = vec![
        ("signing-key-file", sk.as_str()),
        ("upload-to", url.as_str()),
    ];
    if let Some(b) = batch {
        cfg.push(("batch-size", b));
    }
    let d = Daemon::start(env, &cfg);
    let mut conn = Conn::open(&d.socket()).expect("connect");
    let start = Instant::now();
    assert_eq!(conn.enqueue(paths), paths.len());
    let took = wait_drained(&mut conn, start, DRAIN_BOUND);
    let dropped = conn.status_number("dropped");
    assert_eq!(dropped, 0, "paths dropped:\n{}", d.log());
    assert_eq!(
        narinfos(cache),
        paths.len(),
        "cache incomplete:\n{}",
        d.log()
    );
    paths.len() as f64 / took.as_secs_f64()
}

/// Runs the rounds and returns the rows of figure 3.
pub fn run(mode: &Mode) -> Vec<Row> {
    let env = NixEnv::new("bench-drain");
    let (sk, _pk) = env.gen_signing_key("bench-1");
    let paths = add_store_paths(&env, mode.drain_paths);
    let few = &paths[..mode.drain_bs1_paths];
    let [mut def, mut bs1, mut bare, mut speedup, mut of_bare] =
        std::array::from_fn(|_| Samples::new());
    for round in 0..mode.drain_rounds {
        let mut rate = [0.0f64; 3];
        for j in 0..3 {
            let which = (round + j) % 3;
            let cache = env.root().join(format!("cache-{round}-{which}"));
            rate[which] = match which {
                0 => drain_with(&env, &sk, &cache, &paths, None),
                1 => drain_with(&env, &sk, &cache, few, Some("1")),
                _ => {
                    let url = format!("file://{}", cache.display());
                    let to_sign: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
                    let start = Instant::now();
                    env.sign(&sk, &to_sign);
                    run_ok(env.cmd("nix").args(["copy", "--to", &url]).args(&paths));
                    let took = start.elapsed();
                    assert_eq!(narinfos(&cache), paths.len());
                    paths.len() as f64 / took.as_secs_f64()
                }
            };
        }
        def.push(rate[0]);
        bs1.push(rate[1]);
        bare.push(rate[2]);
        speedup.push(rate[0] / rate[1]);
        of_bare.push(100.0 * rate[0] / rate[2]);
    }
    let n = mode.drain_paths;
    keep_until_the_end(env);
    vec![
        Row::from_samples(
            &format!("3a drain {n} paths, default batch-size, to file:// (xz)"),
            &def,
            "paths/s",
            Goal::AtLeast(1000.0),
        )
        .note(format!(
            "{:.0}% of bare nix (3c), which bounds it",
            of_bare.median()
        )),
        Row::from_samples(
            "3b speed-up: default batch-size / batch-size 1",
            &speedup,
            "x",
            Goal::AtLeast(10.0),
        )
        .note(format!(
            "batch-size 1: {:.1} paths/s, measured on {} paths",
            bs1.median(),
            mode.drain_bs1_paths
        )),
        Row::from_samples(
            &format!("3c bare nix store sign + nix copy of {n} paths, one call each"),
            &bare,
            "paths/s",
            Goal::Info,
        )
        .note("no daemon: the bound nix sets"),
    ]
}
