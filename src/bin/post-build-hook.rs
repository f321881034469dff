//! The hook Nix runs after each build: hands the built paths to the daemon
//! (or to the spool) and always exits 0, so a queue problem never fails a
//! build.

use std::io::Write;

use npbhq::client;

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => {}
        Some("--version") => {
            println!("post-build-hook {}", npbhq::VERSION);
            return;
        }
        Some(_) => {
            println!(
                "Usage: post-build-hook   (run by Nix as its post-build-hook; takes no arguments)\n\
                 Reads OUT_PATHS, or DRV_PATH when OUT_PATHS is empty, and hands them to\n\
                 post-build-hook-queue at ${} (default {}), or to the spool ${} (default {}).\n\
                 Waits at most ${} seconds (default {}). Always exits 0.",
                client::ENV_SOCKET,
                npbhq::config::default_socket().display(),
                client::ENV_SPOOL,
                client::spool_dir().display(),
                client::ENV_TIMEOUT,
                client::DEFAULT_HOOK_TIMEOUT.as_secs()
            );
            return;
        }
    }
    let out_paths = std::env::var("OUT_PATHS").unwrap_or_default();
    let drv_path = std::env::var("DRV_PATH").unwrap_or_default();
    let outcome = client::hook(
        &out_paths,
        &drv_path,
        &client::socket_path(),
        &client::spool_dir(),
        client::hook_timeout(),
    );
    if !matches!(outcome, client::HookOutcome::Queued) {
        // One write for the whole line (stderr is unbuffered, and eprintln!
        // would write every piece of the message separately to Nix's pipe).
        let line = format!("post-build-hook: {outcome}\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}
