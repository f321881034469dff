//! Floors measured in the same run, so that every figure can be read
//! against what any program would pay here: a std Rust program built with
//! the release profile's settings (its size, its start-up time, its memory),
//! a static program without libc that only exits (the least an exec costs),
//! an `fdatasync` of a journal record, and a crash-safe spool write.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::common::{run_ok, TempDir};
use crate::stats::Samples;

/// The source of the floor program: does nothing with no argument, prints
/// `hello` with `hello`, sleeps N milliseconds with a number.
const FLOOR_SRC: &str = r#"fn main() {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("hello") => println!("hello"),
        Some(ms) => std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0))),
    }
}
"#;

/// The source of the bare floor program (x86_64 Linux): its entry point
/// makes the `exit_group(0)` system call, and that is all.
const BARE_SRC: &str = r#"#![no_std]
#![no_main]
core::arch::global_asm!(".globl _start", "_start:", "mov eax, 231", "xor edi, edi", "syscall");
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
"#;

/// The floor programs, compiled here.
pub struct FloorProgram {
    /// The std program, with the release profile's settings, stripped.
    pub bin: PathBuf,
    /// The static program without libc, linked as the hook is on x86_64
    /// Linux (`None` elsewhere).
    pub bare: Option<PathBuf>,
    _dir: TempDir,
}

impl FloorProgram {
    /// Compiles the floor programs with `rustc` (the toolchain running this
    /// benchmark): the std one with opt-level z, fat LTO, one codegen unit,
    /// panic=abort, stripped, like `[profile.release]`.
    pub fn build() -> FloorProgram {
        let dir = TempDir::new("bench-floor");
        let src = dir.join("floor.rs");
        fs::write(&src, FLOOR_SRC).expect("write floor.rs");
        let bin = dir.join("floor");
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        run_ok(
            Command::new(&rustc)
                .args([
                    "--edition=2021",
                    "-Copt-level=z",
                    "-Clto=fat",
                    "-Ccodegen-units=1",
                    "-Cpanic=abort",
                    "-Cstrip=symbols",
                    "-o",
                ])
                .arg(&bin)
                .arg(&src),
        );
        let bare = cfg!(all(target_os = "linux", target_arch = "x86_64")).then(|| {
            let src = dir.join("bare.rs");
            fs::write(&src, BARE_SRC).expect("write bare.rs");
            let bare = dir.join("bare");
            run_ok(
                Command::new(&rustc)
                    .args([
                        "--edition=2021",
                        "-Copt-level=z",
                        "-Cpanic=abort",
                        "-Clink-arg=-nostartfiles",
                        "-Clink-arg=-static",
                        "-Clink-arg=-no-pie",
                        "-o",
                    ])
                    .arg(&bare)
                    .arg(&src),
            );
            bare
        });
        FloorProgram {
            bin,
            bare,
            _dir: dir,
        }
    }
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
