//! Figure 8: binary size, information only. The two binaries cargo built for
//! this run (release profile under `cargo bench`), stripped again to be
//! sure, the libraries they load (`ldd`), and for scale the floor program
//! (a std program that does nothing, built with the same profile): what any
//! std binary pays, mostly std's panic and backtrace machinery, which stable
//! Rust cannot leave out.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::common::{daemon_bin, hook_bin, run_ok, TempDir};
use crate::floor::FloorProgram;
use crate::stats::{Goal, Row};

fn stripped_kib(bin: &Path, dir: &Path) -> f64 {
    let copy = dir.join(bin.file_name().expect("binary name"));
    fs::copy(bin, &copy).expect("copy binary");
    run_ok(Command::new("strip").arg(&copy));
    fs::metadata(&copy).expect("stat binary").len() as f64 / 1024.0
}

/// The libraries `bin` loads (`ldd`), by file name.
fn libraries(bin: &Path) -> Vec<String> {
    run_ok(Command::new("ldd").arg(bin))
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|lib| lib.rsplit('/').next().unwrap_or(lib).to_string())
        .filter(|lib| !lib.starts_with("linux-vdso"))
        .collect()
}

/// Returns the row of figure 8.
pub fn run_figure(floor: &FloorProgram) -> Vec<Row> {
    let tmp = TempDir::new("bench-size");
    let hook = stripped_kib(&hook_bin(), tmp.path());
    let daemon = stripped_kib(&daemon_bin(), tmp.path());
    let floor = stripped_kib(&floor.bin, tmp.path());
    let mut libs = libraries(&hook_bin());
    libs.extend(libraries(&daemon_bin()));
    libs.sort();
    libs.dedup();
    vec![Row::single(
        "8 both binaries, stripped",
        hook + daemon,
        &format!("hook {hook:.0} + daemon {daemon:.0} KiB"),
        "KiB",
        Goal::Info,
    )
    .note(format!(
        "a std program that does nothing, same profile: {floor:.0} KiB; they load {}",
        libs.join(", ")
    ))]
}
