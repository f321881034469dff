//! Figure 8: binary size and dependencies. The two binaries cargo built for
//! this run (release profile under `cargo bench`), stripped again to be sure,
//! their `ldd` list, and for scale the floor program (a std "hello world"
//! compiled here with the same release settings): what any std binary pays,
//! mostly std's panic and backtrace machinery, which stable Rust cannot
//! leave out.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::common::{daemon_bin, hook_bin, run, TempDir};
use crate::floor::FloorProgram;
use crate::stats::{Goal, Row};

/// Libraries of the C runtime that every Linux program may use.
const LIBC_FAMILY: &[&str] = &[
    "linux-vdso.so",
    "ld-linux",
    "libc.so",
    "libm.so",
    "libpthread.so",
    "libdl.so",
    "librt.so",
    "libgcc_s.so",
];

fn stripped_size(bin: &Path, dir: &Path) -> u64 {
    let copy = dir.join(bin.file_name().expect("binary name"));
    fs::copy(bin, &copy).expect("copy binary");
    let o = run(Command::new("strip").arg(&copy));
    assert!(o.status.success(), "strip failed: {o:?}");
    fs::metadata(&copy).expect("stat binary").len()
}

/// The libraries `bin` loads: none for a static executable (the hook on
/// x86_64 Linux), which `ldd` refuses with "not a dynamic executable".
fn libraries(bin: &Path) -> Vec<String> {
    let o = run(Command::new("ldd").arg(bin));
    let text = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        assert!(
            text.contains("not a dynamic executable"),
            "ldd failed: {o:?}"
        );
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|lib| lib.rsplit('/').next().unwrap_or(lib).to_string())
        .collect()
}

/// Returns the rows of figure 8.
pub fn run_figure(floor: &FloorProgram) -> Vec<Row> {
    let tmp = TempDir::new("bench-size");
    let hook = stripped_size(&hook_bin(), tmp.path()) as f64 / 1024.0;
    let daemon = stripped_size(&daemon_bin(), tmp.path()) as f64 / 1024.0;
    let floor = stripped_size(&floor.bin, tmp.path()) as f64 / 1024.0;
    let mut libs: Vec<String> = libraries(&hook_bin());
    libs.extend(libraries(&daemon_bin()));
    libs.sort();
    libs.dedup();
    let foreign: Vec<&String> = libs
        .iter()
        .filter(|l| !LIBC_FAMILY.iter().any(|f| l.starts_with(f)))
        .collect();
    vec![
        Row::single(
            "8a both binaries, stripped",
            hook + daemon,
            &format!("hook {hook:.0} + daemon {daemon:.0} KiB"),
            "KiB",
            Goal::AtMost(700.0),
        )
        .note(format!(
            "floor: std hello world, same settings: {floor:.0} KiB, {:.0} KiB for two",
            2.0 * floor
        )),
        Row::single(
            "8b libraries outside the libc family (ldd)",
            foreign.len() as f64,
            &libs.join(" "),
            "",
            Goal::AtMost(0.0),
        ),
    ]
}
