//! The daemon and its admin commands; see `post-build-hook-queue --help`.

fn main() {
    std::process::exit(npbhq::cli::main(std::env::args_os().skip(1)));
}
