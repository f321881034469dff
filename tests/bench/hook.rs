//! Figures 1 and 4: what Nix waits for. Wall time of one `post-build-hook`
//! process (spawn to exit), measured like hyperfine against `/bin/true` in
//! the same loop, with the same environment and stdio.
//!
//! The daemon is configured as in production (signing key, `file://`
//! target), with its worker held in its first nix call by a
//! nix-delay-wrapper, as during a long upload: the figure is the hand-over
//! itself, not the CPU that nix takes on a 2-core machine. Every hook call
//! carries new paths, so every acknowledgement costs a journal `fdatasync`.
//! The floors (an `fdatasync`, a crash-safe file write, and what a std
//! program that does nothing pays over `/bin/true`, which the hook avoids by
//! being built without std) are measured in the same run.

use std::fs::{self, File};
use std::process::{Command, Stdio};

use crate::common::{hook_bin, Daemon, NixEnv, NO_ENV};
use crate::floor::{fdatasync_ms, spool_write_ms, FloorProgram};
use crate::stats::{Goal, Row, Samples};
use crate::util::{fake_paths, keep_until_the_end, nix_delay_wrapper, time_run, Mode};

/// Warm-up runs per variant, not recorded.
const WARMUP: usize = 20;

struct Variant {
    name: &'static str,
    program: std::path::PathBuf,
    socket: String,
    spool: String,
    paths: usize,
    stderr: File,
    samples: Samples,
}

/// Figure 1 (hook latency: 1 path, 10 paths, daemon down) and figure 4 (one
/// request of 1,000 paths).
pub fn run(mode: &Mode, floor: &FloorProgram) -> (Vec<Row>, Vec<Row>) {
    let env = NixEnv::new("bench-hook");
    let (sk, _pk) = env.gen_signing_key("bench-1");
    let cache = format!("file://{}", env.root().join("cache").display());
    let wrapper = nix_delay_wrapper(&env);
    let mut d = Daemon::new_stopped(
        &env,
        &[
            ("signing-key-file", sk.display().to_string().as_str()),
            ("upload-to", &cache),
            ("nix", &wrapper.display().to_string()),
        ],
        NO_ENV,
    );
    d.try_spawn().unwrap_or_else(|e| panic!("{e}"));
    let store = env.store_dir();
    let socket = d.socket().display().to_string();
    let spool = d.spool_dir().display().to_string();
    let down_spool = env.root().join("spool-down");
    let down_socket = env.root().join("no-daemon.sock").display().to_string();
    let err = |name: &str| File::create(env.root().join(format!("{name}.stderr"))).unwrap();

    let mut variants = [
        Variant {
            name: "true",
            program: "/bin/true".into(),
            socket: socket.clone(),
            spool: spool.clone(),
            paths: 1,
            stderr: err("true"),
            samples: Samples::new(),
        },
        Variant {
            name: "hook1",
            program: hook_bin(),
            socket: socket.clone(),
            spool: spool.clone(),
            paths: 1,
            stderr: err("hook1"),
            samples: Samples::new(),
        },
        Variant {
            name: "hook10",
            program: hook_bin(),
            socket: socket.clone(),
            spool: spool.clone(),
            paths: 10,
            stderr: err("hook10"),
            samples: Samples::new(),
        },
        Variant {
            name: "down",
            program: hook_bin(),
            socket: down_socket,
            spool: down_spool.display().to_string(),
            paths: 1,
            stderr: err("down"),
            samples: Samples::new(),
        },
        Variant {
            name: "floor",
            program: floor.bin.clone(),
            socket: socket.clone(),
            spool: spool.clone(),
            paths: 1,
            stderr: err("floor"),
            samples: Samples::new(),
        },
    ]
    .into_iter()
    .chain(floor.bare.iter().map(|bare| Variant {
        name: "bare",
        program: bare.clone(),
        socket: socket.clone(),
        spool: spool.clone(),
        paths: 1,
        stderr: err("bare"),
        samples: Samples::new(),
    }))
    .collect::<Vec<_>>();
    let path_env = std::env::var("PATH").unwrap_or_default();
    let k = variants.len();
    for i in 0..WARMUP + mode.hook_runs {
        for j in 0..k {
            // Rotate the order so no variant always follows another.
            let v = &mut variants[(i + j) % k];
            let out_paths = fake_paths(&store, v.paths).join(" ");
            let mut cmd = Command::new(&v.program);
            cmd.env_clear()
                .env("PATH", &path_env)
                .env("NPBHQ_SOCKET", &v.socket)
                .env("NPBHQ_SPOOL_DIR", &v.spool)
                .env("OUT_PATHS", &out_paths)
                .env("DRV_PATH", "")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(v.stderr.try_clone().unwrap());
            let ms = time_run(&mut cmd);
            if i >= WARMUP {
                v.samples.push(ms);
            }
        }
    }

    // Correctness, not speed: with the daemon up the hook printed nothing
    // (it prints only when it could not hand the paths over), and with the
    // daemon down every run left a spool file.
    for name in ["hook1", "hook10"] {
        let text = fs::read_to_string(env.root().join(format!("{name}.stderr"))).unwrap();
        assert!(
            text.is_empty(),
            "{name}: the hook did not hand over: {text}\n{}",
            d.log()
        );
    }
    let spooled = fs::read_dir(&down_spool)
        .map(|r| {
            r.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".req"))
            })
            .count()
        })
        .unwrap_or(0);
    assert_eq!(
        spooled,
        WARMUP + mode.hook_runs,
        "daemon-down runs must each leave a spool file"
    );

    let get = |name: &str| {
        variants
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.samples.clone())
            .unwrap()
    };
    let t = get("true");
    let base = t.median();
    let hook1 = get("hook1");
    let start_floor = get("floor").minus(base);
    let n = mode.hook_runs.min(300);
    let sync_floor = fdatasync_ms(&d.state_dir(), n);
    let spool_floor = spool_write_ms(&env.root().join("spool-floor"), n);
    let mut rows = vec![
        Row::from_samples(
            "1a hook, 1 path, daemon up: above /bin/true",
            &hook1.minus(base),
            "ms",
            Goal::AtMost(0.5),
        )
        .note(format!(
            "hook {:.3} ms, /bin/true {:.3} ms; floor 1g: {:.3} ms",
            hook1.median(),
            base,
            sync_floor.median()
        )),
        Row::single(
            "1b hook, 1 path: p99 above /bin/true p99",
            hook1.pct(99.0) - t.pct(99.0),
            &format!(
                "p99 hook {:.3} ms, /bin/true {:.3} ms",
                hook1.pct(99.0),
                t.pct(99.0)
            ),
            "ms",
            Goal::AtMost(2.0),
        ),
        Row::from_samples(
            "1c hook, 10 paths: above /bin/true",
            &get("hook10").minus(base),
            "ms",
            Goal::AtMost(0.5),
        ),
        Row::from_samples(
            "1d hook, daemon down (spool): above /bin/true",
            &get("down").minus(base),
            "ms",
            Goal::AtMost(1.0),
        )
        .note(format!("floor 1h: {:.3} ms", spool_floor.median())),
    ];
    rows.push(
        Row::from_samples("1e /bin/true (the baseline)", &t, "ms", Goal::Info)
            .note("spawn to exit, same environment"),
    );
    rows.push(
        Row::from_samples(
            "1f floor: a std Rust program that does nothing, above /bin/true",
            &start_floor,
            "ms",
            Goal::Info,
        )
        .note("what std's start-up would add to the hook, which is built without std"),
    );
    rows.push(
        Row::from_samples(
            "1g floor: fdatasync of one journal record",
            &sync_floor,
            "ms",
            Goal::Info,
        )
        .note("in the daemon's state directory"),
    );
    rows.push(
        Row::from_samples(
            "1h floor: crash-safe new file (create, fdatasync, rename, fsync dir)",
            &spool_floor,
            "ms",
            Goal::Info,
        )
        .note("what a spooled request costs in any program"),
    );
    if floor.bare.is_some() {
        rows.push(
            Row::from_samples(
                "1i floor: a static program without libc that only exits, above /bin/true",
                &get("bare").minus(base),
                "ms",
                Goal::Info,
            )
            .note("the least an exec costs; the hook is built this way on x86_64 Linux"),
        );
    }

    // Figure 4: one hook call carrying a burst of paths, exec to exit.
    let mut burst = Samples::new();
    let burst_err = env.root().join("burst.stderr");
    for _ in 0..mode.burst_runs {
        let out_paths = fake_paths(&store, mode.burst_paths).join(" ");
        let mut cmd = Command::new(hook_bin());
        cmd.env_clear()
            .env("PATH", &path_env)
            .env("NPBHQ_SOCKET", &socket)
            .env("NPBHQ_SPOOL_DIR", &spool)
            .env("OUT_PATHS", &out_paths)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&burst_err).unwrap());
        burst.push(time_run(&mut cmd));
        let text = fs::read_to_string(&burst_err).unwrap();
        assert!(text.is_empty(), "burst: the hook did not hand over: {text}");
    }
    let burst_rows = vec![Row::from_samples(
        &format!(
            "4 burst: hook with {} paths, exec to exit",
            mode.burst_paths
        ),
        &burst,
        "ms",
        Goal::AtMost(50.0),
    )
    .note("acked = journaled and fdatasynced")];
    keep_until_the_end(env);
    (rows, burst_rows)
}
