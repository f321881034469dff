//! Floors measured in the same run, so that every figure can be read
//! against what any program would pay here: a std Rust program built with
//! this crate's profile (its start-up time, its memory, its size), an
//! `fdatasync` of a journal record, and a crash-safe spool write.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::common::{run_ok, TempDir};
use crate::stats::Samples;

/// The source of the floor program: does nothing with no argument, sleeps
/// N milliseconds with a number.
const FLOOR_SRC: &str = r#"fn main() {
    if let Some(ms) = std::env::args().nth(1) {
        std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0)));
    }
}
"#;

/// The floor program, compiled here.
pub struct FloorProgram {
    /// The std program, built by cargo with this crate's profile.
    pub bin: PathBuf,
    _dir: TempDir,
}

impl FloorProgram {
    /// Builds the floor program with cargo in a scratch package whose
    /// `[profile.NAME]` is a copy of this crate's (`release` for the full
    /// benchmark, `dev` for the quick mode), so that it is built exactly as
    /// the two binaries are.
    pub fn build(profile: &str) -> FloorProgram {
        let dir = TempDir::new("bench-floor");
        let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let ours = fs::read_to_string(&ours).expect("read Cargo.toml");
        let manifest = format!(
            "[package]\nname = \"floor\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [workspace]\n\n{}",
            section(&ours, &format!("[profile.{profile}]"))
        );
        fs::write(dir.join("Cargo.toml"), manifest).expect("write floor Cargo.toml");
        fs::create_dir(dir.join("src")).expect("create floor src");
        fs::write(dir.join("src/main.rs"), FLOOR_SRC).expect("write floor main.rs");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run_ok(
            Command::new(cargo)
                .args(["build", "--quiet", "--offline", "--profile", profile])
                .arg("--target-dir")
                .arg(dir.join("target"))
                .current_dir(dir.path()),
        );
        let out = if profile == "dev" { "debug" } else { profile };
        FloorProgram {
            bin: dir.join(format!("target/{out}/floor")),
            _dir: dir,
        }
    }
}

/// The lines of `toml` from the header `header` up to the next header
/// (empty when there is no such section: cargo's defaults apply to both).
fn section(toml: &str, header: &str) -> String {
    let mut inside = false;
    let mut keep = |line: &str| {
        if line.trim_start().starts_with('[') {
            inside = line.trim() == header;
        }
        inside
    };
    let lines = toml.lines().filter(|l| keep(l));
    lines.map(|l| format!("{l}\n")).collect()
}

/// Milliseconds of `fdatasync` after appending one journal-sized record to a
/// file in `dir`, `n` times: the least an acknowledgement can cost.
pub fn fdatasync_ms(dir: &Path, n: usize) -> Samples {
    let path = dir.join("fdatasync-floor");
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open fdatasync floor file");
    let record = format!("+ 1795531018 {}/{}-floor\n", dir.display(), "0".repeat(32));
    let mut s = Samples::new();
    for _ in 0..n {
        let start = Instant::now();
        (&file).write_all(record.as_bytes()).expect("append");
        file.sync_data().expect("fdatasync");
        s.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = fs::remove_file(&path);
    s
}

/// Milliseconds of a crash-safe new file in `dir` (create, write,
/// `fdatasync`, rename, `fsync` of the directory), `n` times: what a spooled
/// request costs at least, whatever program writes it.
pub fn spool_write_ms(dir: &Path, n: usize) -> Samples {
    fs::create_dir_all(dir).expect("create spool floor dir");
    let mut s = Samples::new();
    for i in 0..n {
        let tmp = dir.join(format!(".{i}.tmp"));
        let done = dir.join(format!("{i}.req"));
        let start = Instant::now();
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .expect("create");
            f.write_all(b"enqueue /nix/store/00000000000000000000000000000000-floor\n")
                .expect("write");
            f.sync_data().expect("fdatasync");
        }
        fs::rename(&tmp, &done).expect("rename");
        File::open(dir)
            .and_then(|d| d.sync_all())
            .expect("fsync dir");
        s.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = fs::remove_dir_all(dir);
    s
}
