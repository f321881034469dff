# Builds both binaries, `post-build-hook` (the client Nix runs) and
# `post-build-hook-queue` (the daemon), with nixpkgs' rustPlatform.
#
#   nix-build                      # uses <nixpkgs>
#   pkgs.callPackage ./default.nix { }   # what module.nix and flake.nix do
#
# `lib` and `rustPlatform` are arguments of their own so that callPackage
# passes the spliced (cross-compilation aware) ones; `nix-build` takes them
# from `pkgs`.
{
  pkgs ? import <nixpkgs> { },
  lib ? pkgs.lib,
  rustPlatform ? pkgs.rustPlatform,
}:

let
  # Name, version and description come from Cargo.toml only.
  manifest = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package;

  # Only what `cargo build` reads: editing README.md, tests/, the .nix files
  # or CI scripts leaves this source (and so the package) unchanged.
  # builtins.path rather than lib.fileset so that any nixpkgs works.
  src = builtins.path {
    name = "${manifest.name}-${manifest.version}-source";
    path = ./.;
    filter =
      path: type:
      let
        rel = lib.removePrefix (toString ./. + "/") (toString path);
      in
      builtins.elem rel [
        "Cargo.toml"
        "Cargo.lock"
        "src"
      ]
      || lib.hasPrefix "src/" rel;
  };
in
rustPlatform.buildRustPackage {
  pname = manifest.name;
  inherit (manifest) version;
  inherit src;

  # The crate uses std only, so the lock file lists no dependencies and
  # nothing is vendored; no cargoHash to keep up to date.
  cargoLock.lockFile = ./Cargo.lock;

  # checkPhase runs the unit tests only: the library's and both binaries'.
  # The integration tests in tests/ start a real Nix store, nix-daemon and
  # sshd, none of which exist inside the build sandbox, so they are left out
  # (not even in `src`); CI runs them. Unit tests must therefore not need
  # nix, sshd or the network.
  cargoTestFlags = [
    "--lib"
    "--bins"
  ];

  meta = {
    inherit (manifest) description;
    license = lib.licenses.mit;
    mainProgram = "post-build-hook-queue";
    # It reads /proc and makes Linux system calls; nothing is specific to
    # an architecture.
    platforms = lib.platforms.linux;
  };
}
