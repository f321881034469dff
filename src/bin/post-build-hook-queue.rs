//! The daemon and its admin commands; see `post-build-hook-queue --help`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(npbhq::cli::main(&args));
}
