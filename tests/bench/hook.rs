//! Figures 1 and 4: what Nix waits for. Wall time of one `post-build-hook`
//! process (spawn to exit), measured like hyperfine beside `/bin/true` and
//! a std program that does nothing, in the same loop, with the same
//! environment and stdio. Information only: what users feel is the build
//! loop (figure 2).
//!
//! The daemon is configured as in production (signing key, `file://`
//! target), with its worker held in its first nix call by a
//! nix-delay-wrapper, as during a long upload: the figure is the hand-over
//! itself, not the CPU that nix takes on a 2-core machine. Every hook call
//! carries new paths, so every acknowledgement costs a journal `fdatasync`.
//! The floors (a std program's exec to exit, an `fdatasync`, a crash-safe
//! file write) are measured in the same run.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::{hook_bin, NixEnv};
use crate::floor::{fdatasync_ms, spool_write_ms, FloorProgram};
use crate::stats::{Goal, Row, Samples};
use crate::util::{fake_paths, held_daemon, keep_until_the_end, time_run, Mode};

/// Warm-up runs per variant, not recorded.
const WARMUP: usize = 20;
/// The note of the rows measured like the hook.
const SAME: &str = "exec to exit, same environment";

struct Variant {
    name: &'static str,
    program: PathBuf,
    socket: String,
    spool: PathBuf,
    stderr: File,
    samples: Samples,
}

/// Figure 1 (the hook's own cost, daemon up and down, and its floors) and
/// figure 4 (one request of 1,000 paths).
pub fn run(mode: &Mode, floor: &FloorProgram) -> (Vec<Row>, Vec<Row>) {
    let env = NixEnv::new("bench-hook");
    let (sk, _pk) = env.gen_signing_key("bench-1");
    let d = held_daemon(&env, &sk);
    let store = env.store_dir();
    let socket = d.socket().display().to_string();
    let spool = d.spool_dir();
    let down_spool = env.root().join("spool-down");
    let down_socket = env.root().join("no-daemon.sock").display().to_string();

    let variant = |name, program: &Path, socket: &str, spool: &Path| Variant {
        name,
        program: program.to_path_buf(),
        socket: socket.to_string(),
        spool: spool.to_path_buf(),
        stderr: File::create(env.root().join(format!("{name}.stderr"))).unwrap(),
        samples: Samples::new(),
    };
    let mut variants = [
        variant("true", "/bin/true".as_ref(), &socket, &spool),
        variant("floor", &floor.bin, &socket, &spool),
        variant("up", &hook_bin(), &socket, &spool),
        variant("down", &hook_bin(), &down_socket, &down_spool),
    ];
    let path_env = std::env::var("PATH").unwrap_or_default();
    let k = variants.len();
    for i in 0..WARMUP + mode.hook_runs {
        for j in 0..k {
            // Rotate the order so no variant always follows another.
            let v = &mut variants[(i + j) % k];
            let out_paths = fake_paths(&store, 1).join(" ");
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
    let text = fs::read_to_string(env.root().join("up.stderr")).unwrap();
    let log = d.log();
    assert!(text.is_empty(), "the hook did not hand over: {text}\n{log}");
    let spooled = fs::read_dir(&down_spool).into_iter().flatten().flatten();
    let spooled = spooled.filter(|e| e.file_name().to_string_lossy().ends_with(".req"));
    assert_eq!(
        spooled.count(),
        WARMUP + mode.hook_runs,
        "daemon-down runs must each leave a spool file"
    );

    let get = |name: &str| {
        variants
            .iter()
            .find(|v| v.name == name)
            .unwrap()
            .samples
            .clone()
    };
    let floor_ms = get("floor").median();
    let n = mode.hook_runs.min(300);
    let sync_floor = fdatasync_ms(&d.state_dir(), n);
    let spool_floor = spool_write_ms(&env.root().join("spool-floor"), n);
    let (up, down) = (get("up"), get("down"));
    let info = |name: &str, s: &Samples, note: &str| {
        Row::from_samples(name, s, "ms", Goal::Info).note(note)
    };
    let rows = vec![
        info(
            "1a hook, daemon up: exec to exit, acknowledged",
            &up,
            &format!(
                "{:+.3} ms against 1d; the daemon's answer includes one fdatasync (1e)",
                up.median() - floor_ms
            ),
        ),
        info(
            "1b hook, daemon down: exec to exit, spooled",
            &down,
            &format!(
                "{:+.3} ms against 1d; a crash-safe file (1f) included",
                down.median() - floor_ms
            ),
        ),
        info("1c /bin/true", &get("true"), SAME),
        info(
            "1d floor: a std program that does nothing, same profile",
            &get("floor"),
            SAME,
        ),
        info(
            "1e floor: fdatasync of one journal record",
            &sync_floor,
            "in the daemon's state directory",
        ),
        info(
            "1f floor: crash-safe new file (create, fdatasync, rename, fsync dir)",
            &spool_floor,
            "what a spooled request costs in any program",
        ),
    ];

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
    let n = mode.burst_paths;
    let burst_rows = vec![Row::from_samples(
        &format!("4 burst: hook with {n} paths, exec to exit"),
        &burst,
        "ms",
        Goal::AtMost(50.0),
    )
    .note("acked = journaled and fdatasynced")];
    keep_until_the_end(env);
    (rows, burst_rows)
}
