//! Figures 5, 6 and 7: the daemon's own costs. Enqueue throughput with many
//! concurrent clients (each acknowledgement durable), peak memory idle
//! (beside a std program that sleeps) and with a big queue, and the time a
//! restart with that queue takes until the socket accepts again (journal
//! replay).

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::common::{kill_tree, Daemon, NixEnv, NO_ENV};
use crate::floor::FloorProgram;
use crate::stats::{num, Goal, Row, Samples};
use crate::util::{
    fake_paths, held_daemon, keep_until_the_end, nix_delay_wrapper, vm_hwm_mib, Conn, DaemonProc,
    Mode,
};

/// One round of `mode.clients` threads each sending `mode.per_client`
/// paths; with `fresh_connections` every path gets its own connection (as
/// the hook does), else each client keeps one. Returns paths per second.
fn enqueue_round(socket: &Path, store: &Path, mode: &Mode, fresh_connections: bool) -> f64 {
    let (clients, per_client) = (mode.clients, mode.per_client);
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let paths = fake_paths(store, per_client);
            let socket = socket.to_path_buf();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let mut conn = None;
                for p in paths {
                    if fresh_connections || conn.is_none() {
                        conn = Some(Conn::open(&socket).expect("connect"));
                    }
                    let c = conn.as_mut().expect("connected");
                    assert_eq!(c.enqueue(std::slice::from_ref(&p)), 1);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for t in threads {
        t.join().expect("client thread");
    }
    (clients * per_client) as f64 / start.elapsed().as_secs_f64()
}

/// Figure 5. The daemon is configured as in production, its worker held in
/// its first nix call (as during a long upload), so that the figure is the
/// connection threads and the journal's group commit.
pub fn enqueue(mode: &Mode) -> Vec<Row> {
    let env = NixEnv::new("bench-enqueue");
    let (sk, _pk) = env.gen_signing_key("bench-1");
    let d = held_daemon(&env, &sk);
    let store = env.store_dir();
    let (mut fresh, mut kept) = (Samples::new(), Samples::new());
    for round in 0..mode.enqueue_rounds {
        for j in 0..2 {
            let fresh_conn = (round + j) % 2 == 0;
            let rate = enqueue_round(&d.socket(), &store, mode, fresh_conn);
            if fresh_conn {
                fresh.push(rate);
            } else {
                kept.push(rate);
            }
        }
    }
    let c = mode.clients;
    keep_until_the_end(env);
    vec![
        Row::from_samples(
            &format!("5a enqueue, {c} clients, one request per path"),
            &kept,
            "paths/s",
            Goal::AtLeast(20_000.0),
        )
        .note("each client keeps its connection; each ok = journaled and fdatasynced"),
        Row::from_samples(
            &format!("5b enqueue, {c} clients, a new connection per path"),
            &fresh,
            "paths/s",
            Goal::Info,
        )
        .note("as hooks connect: adds a connection set up and served per path"),
    ]
}

/// Figures 6 and 7.
pub fn memory_and_restart(mode: &Mode, floor: &FloorProgram) -> (Vec<Row>, Vec<Row>) {
    let env = NixEnv::new("bench-mem");
    let (sk, _pk) = env.gen_signing_key("bench-1");
    let sk = sk.display().to_string();
    let cache = format!("file://{}", env.root().join("cache").display());
    let config = [("signing-key-file", sk.as_str()), ("upload-to", &cache)];

    // Idle: a fresh daemon configured as in production, nothing queued,
    // and beside it, in the same rounds, the floor program sleeping.
    let (mut idle, mut floor_idle) = (Samples::new(), Samples::new());
    for _ in 0..mode.idle_rounds {
        let d = Daemon::new_stopped(&env, &config, NO_ENV);
        let (p, _) = DaemonProc::start(&env, &d);
        let mut conn = Conn::open(&d.socket()).expect("connect");
        assert_eq!(conn.status_number("queued"), 0);
        let mut sleeper = std::process::Command::new(&floor.bin)
            .arg("5000")
            .spawn()
            .expect("start the floor program");
        std::thread::sleep(Duration::from_millis(300));
        idle.push(vm_hwm_mib(p.child.id()));
        floor_idle.push(vm_hwm_mib(sleeper.id()));
        kill_tree(sleeper.id());
        let _ = sleeper.wait();
    }
    let above_floor = idle.median() - floor_idle.median();

    // A big queue: the daemon's nix calls are held by a delay wrapper, so
    // every path stays queued.
    let wrapper = nix_delay_wrapper(&env).display().to_string();
    let d = Daemon::new_stopped(&env, &[config[0], config[1], ("nix", &wrapper)], NO_ENV);
    let n = mode.big_queue;
    let paths = fake_paths(&env.store_dir(), n);
    let (p, _) = DaemonProc::start(&env, &d);
    let mut conn = Conn::open(&d.socket()).expect("connect");
    let start = Instant::now();
    let mut queued = 0;
    for chunk in paths.chunks(1000) {
        queued += conn.enqueue(chunk);
    }
    let enqueue_s = start.elapsed().as_secs_f64();
    assert_eq!(queued, n);
    assert_eq!(conn.status_number("queued"), n as u64);
    std::thread::sleep(Duration::from_millis(300));
    let live_hwm = vm_hwm_mib(p.child.id());
    drop(conn);
    drop(p); // kill -9, the whole tree

    let (mut restart, mut replay_hwm) = (Samples::new(), Samples::new());
    for _ in 0..mode.restart_rounds {
        let (p, ms) = DaemonProc::start(&env, &d);
        restart.push(ms);
        let mut conn = Conn::open(&d.socket()).expect("connect");
        let queued = conn.status_number("queued");
        assert_eq!(queued, n as u64, "replay lost paths:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
        replay_hwm.push(vm_hwm_mib(p.child.id()));
    }

    let k = if n >= 1000 {
        format!("{},000", n / 1000)
    } else {
        n.to_string()
    };
    let mem = vec![
        Row::single(
            "6a daemon VmHWM, idle, above a std program that sleeps",
            above_floor,
            &format!(
                "daemon {}, {}",
                num(idle.median(), "MiB"),
                idle.spread("MiB")
            ),
            "MiB",
            Goal::AtMost(1.0),
        )
        .note("medians of the same rounds; signing key and file:// target set; a fresh start each, so ASLR moves the kernel's 64 KiB fault-around windows"),
        Row::single(
            &format!("6b daemon VmHWM, {k} paths queued through the socket"),
            live_hwm,
            "1 run",
            "MiB",
            Goal::AtMost(32.0),
        )
        .note(format!(
            "in requests of 1,000 paths, {:.0} paths/s",
            n as f64 / enqueue_s
        )),
        Row::from_samples(
            &format!("6c daemon VmHWM, {k} paths replayed from the journal"),
            &replay_hwm,
            "MiB",
            Goal::AtMost(32.0),
        ),
        Row::from_samples(
            "6d floor: VmHWM of a std program that sleeps, same profile",
            &floor_idle,
            "MiB",
            Goal::Info,
        )
        .note("mostly file-backed pages of libc, ld.so and the binary"),
    ];
    let restart = vec![Row::from_samples(
        &format!("7 restart with {k} queued: exec until the socket accepts"),
        &restart,
        "ms",
        Goal::AtMost(200.0),
    )
    .note("journal replay included")];
    keep_until_the_end(env);
    (mem, restart)
}
