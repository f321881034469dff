//! Figure 9: what one piece of work costs the others. (a) The latency of a
//! path to a healthy `file://` target while a second target hangs, against
//! the same target alone. (b) The hook's latency while the journal of
//! 100,000 records is compacted, against the same hook on the idle daemon.
//! (c) `status` with 10,000 spool files, against `status` with none plus a
//! listing of those files. (d) A CI job's `build && wait`: from the end of
//! a `nix-build` until `wait` says every output is signed in the cache,
//! against a bare `nix store sign` and `nix copy` of one path.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{file_cache, hook_bin, run_ok, write_script, Daemon, NixEnv};
use crate::stats::{Goal, Row, Samples};
use crate::util::{
    add_store_paths, fake_paths, keep_until_the_end, nix_delay_wrapper, time_run, Conn, Mode,
};

/// Milliseconds since `start`.
fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// The narinfo a `file://` cache at `cache` holds for store path `path`.
fn narinfo(cache: &Path, path: &str) -> std::path::PathBuf {
    let base = path.rsplit('/').next().unwrap_or(path);
    cache.join(format!("{}.narinfo", &base[..32.min(base.len())]))
}

/// Milliseconds from enqueuing `path` until its narinfo is in `cache`;
/// panics after `bound` (a correctness bound).
fn delivered_ms(d: &Daemon, cache: &Path, path: &str, bound: Duration) -> f64 {
    let mut conn = Conn::open(&d.socket()).expect("connect");
    let start = Instant::now();
    assert_eq!(conn.enqueue(&[path.to_string()]), 1);
    let info = narinfo(cache, path);
    while !info.exists() {
        assert!(
            start.elapsed() < bound,
            "{path} not in {} within {bound:?}:\n{}",
            cache.display(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    ms(start)
}

/// 9a: one path at a time to a healthy target, on a daemon with that
/// target alone and on one whose second target (an uploader) hangs until
/// `command-timeout`, each time it is tried.
fn hung_target(mode: &Mode) -> Row {
    let env = NixEnv::new("bench-hung");
    let hang = env.root().join("hang");
    write_script(&hang, "#!/bin/sh\nexec sleep 3600\n");
    let timeout = mode.hang_timeout.as_secs_f64().to_string();
    let daemon = |name: &str, with_hang: bool| {
        let (url, _) = file_cache(&env, name);
        // Retried soon after each failure: the hung target is tried again
        // and again, as a target in trouble is.
        let hang = hang.display().to_string();
        let mut config = vec![
            ("upload-to", url.as_str()),
            ("command-timeout", &timeout),
            ("retry-initial-delay", "0.1"),
            ("retry-max-delay", "0.5"),
        ];
        if with_hang {
            config.push(("upload-command", &hang));
        }
        (Daemon::start(&env, &config), env.root().join(name))
    };
    let (alone, alone_cache) = daemon("alone", false);
    let (beside, beside_cache) = daemon("beside", true);
    let paths = add_store_paths(&env, 2 * mode.hang_paths);
    let bound = 10 * mode.hang_timeout + Duration::from_secs(60);
    let (mut ratio, mut alone_ms, mut beside_ms) = (Samples::new(), Samples::new(), Samples::new());
    for (i, pair) in paths.chunks(2).enumerate() {
        let mut took = [0.0; 2];
        for j in 0..2 {
            let which = (i + j) % 2;
            took[which] = match which {
                0 => delivered_ms(&alone, &alone_cache, &pair[0], bound),
                _ => delivered_ms(&beside, &beside_cache, &pair[1], bound),
            };
        }
        alone_ms.push(took[0]);
        beside_ms.push(took[1]);
        ratio.push(took[1] / took[0]);
    }
    keep_until_the_end(env);
    Row::from_samples(
        "9a path to a healthy file:// target, second target hung / alone",
        &ratio,
        "x",
        Goal::AtMost(1.5),
    )
    .note(format!(
        "{:.0} ms vs {:.0} ms alone, {} paths, the hung one killed after {} s",
        beside_ms.median(),
        alone_ms.median(),
        mode.hang_paths,
        mode.hang_timeout.as_secs_f64()
    ))
}

/// 9b and 9c, on a daemon whose worker is held in a nix call (so that the
/// spool is not ingested and the queue stays as made).
fn compaction_and_spool(mode: &Mode) -> Vec<Row> {
    let env = NixEnv::new("bench-compact");
    let cache = format!("file://{}", env.root().join("cache").display());
    let wrapper = nix_delay_wrapper(&env).display().to_string();
    let d = Daemon::start(&env, &[("upload-to", &cache), ("nix", &wrapper)]);
    let store = env.store_dir();
    let hook = |path: &str| time_run(d.hook_cmd().env("OUT_PATHS", path).env("DRV_PATH", ""));
    let mut conn = Conn::open(&d.socket()).expect("connect");
    let records = fake_paths(&store, mode.compact_records);
    for chunk in records.chunks(1000) {
        assert_eq!(conn.enqueue(chunk), chunk.len());
    }
    let mut idle = Samples::new();
    for p in fake_paths(&store, mode.hook_samples) {
        idle.push(hook(&p));
    }
    let journal_file = d.state_dir().join("journal");
    let journal_size = || fs::metadata(&journal_file).map_or(0, |m| m.len());
    let before = journal_size();
    // Dropping every record makes most of the journal dead, which compacts it.
    let socket = d.socket();
    let dropper = std::thread::spawn(move || {
        let mut conn = Conn::open(&socket).expect("connect");
        for chunk in records.chunks(1000) {
            let reply = conn.request(&format!("drop {}", chunk.join(" ")));
            let reply = reply.expect("drop");
            let dropped = reply.last().is_some_and(|l| l.starts_with("ok"));
            assert!(dropped, "{reply:?}");
        }
    });
    let mut during = Samples::new();
    for p in fake_paths(&store, 1_000_000) {
        during.push(hook(&p));
        if dropper.is_finished() && during.len() >= 3 {
            break;
        }
    }
    dropper.join().expect("dropper");
    let after = journal_size();

    let spool = d.spool_dir();
    let mut empty = Samples::new();
    for _ in 0..mode.status_samples {
        let start = Instant::now();
        conn.status();
        empty.push(ms(start));
    }
    for (i, p) in fake_paths(&store, mode.spool_files).iter().enumerate() {
        fs::write(
            spool.join(format!("{}-{i}.req", 1_700_000_000 + i)),
            format!("enqueue {p}\n"),
        )
        .expect("spool file");
    }
    let spooled = conn.status_number("spool-files");
    assert_eq!(spooled, mode.spool_files as u64, "{}", d.log());
    let (mut full, mut listing) = (Samples::new(), Samples::new());
    for _ in 0..mode.status_samples {
        let start = Instant::now();
        conn.status();
        full.push(ms(start));
        let start = Instant::now();
        assert_eq!(
            fs::read_dir(&spool).expect("list spool").count(),
            mode.spool_files
        );
        listing.push(ms(start));
    }
    keep_until_the_end(env);
    let records = mode.compact_records;
    vec![
        Row::single(
            &format!("9b hook while a {records}-record journal compacts, slowest / idle median"),
            during.max() / idle.median(),
            &during.spread("ms"),
            "x",
            Goal::AtMost(5.0),
        )
        .note(format!(
            "{} hook runs during the drops: median {:.1} ms, slowest {:.1} ms; idle {:.1} ms; journal {before} bytes before, {after} after",
            during.len(),
            during.median(),
            during.max(),
            idle.median(),
        )),
        Row::single(
            &format!("9c status with {} spool files / (status with none + listing them)", mode.spool_files),
            full.median() / (empty.median() + listing.median()),
            &full.spread("ms"),
            "x",
            Goal::AtMost(2.0),
        )
        .note(format!(
            "{:.1} ms vs {:.2} ms + {:.1} ms",
            full.median(),
            empty.median(),
            listing.median()
        )),
    ]
}

/// 9d: `nix-build` of N derivations with our hook, then `wait`; timed from
/// the build's end until `wait` answers, against a bare sign and copy of
/// one path.
fn build_and_wait(mode: &Mode) -> Row {
    let env = NixEnv::new("bench-wait");
    let (sk, pk) = env.gen_signing_key("bench-1");
    let cache = format!("file://{}", env.root().join("cache").display());
    let sk_s = sk.display().to_string();
    let d = Daemon::start(&env, &[("signing-key-file", &sk_s), ("upload-to", &cache)]);
    let n = mode.build_drvs;
    let (mut ratio, mut waited, mut bare) = (Samples::new(), Samples::new(), Samples::new());
    for round in 0..mode.wait_rounds {
        let tag = format!("wait-{round}");
        let b = env.build(n, &tag, Some(&hook_bin()), &d.hook_env());
        let start = Instant::now();
        let reply = d.request_lines("wait");
        let took = ms(start);
        let last = reply.last().map(String::as_str);
        assert_eq!(last, Some("ok all uploaded"), "{}", d.log());
        b.assert_success();
        env.verify_in_cache(&cache, &pk, &b.out_paths)
            .unwrap_or_else(|e| panic!("not signed in the cache: {e}\n{}", d.log()));
        let one = env.build_paths(1, &format!("wait-bare-{round}"));
        let (_, bare_cache) = file_cache(&env, &format!("bare-{round}"));
        let start = Instant::now();
        env.sign(&sk, &one);
        run_ok(
            env.cmd("nix")
                .args(["copy", "--to", &bare_cache])
                .args(&one),
        );
        let floor = ms(start);
        waited.push(took);
        bare.push(floor);
        ratio.push(took / floor);
    }
    keep_until_the_end(env);
    Row::from_samples(
        &format!(
            "9d build && wait: {n} drvs signed in file:// after the build / bare sign+copy of 1"
        ),
        &ratio,
        "x",
        Goal::AtMost(2.0),
    )
    .note(format!(
        "{:.0} ms after the build vs {:.0} ms",
        waited.median(),
        bare.median()
    ))
}

/// The rows of figure 9.
pub fn run(mode: &Mode) -> Vec<Row> {
    let mut rows = vec![hung_target(mode)];
    rows.extend(compaction_and_spool(mode));
    rows.push(build_and_wait(mode));
    rows
}
