#!/usr/bin/env bash
# Regenerates tests/system/rendered/ from module.nix with nixpkgs' lib:
# the units, config file, users and tmpfiles rules NixOS would install for
# each configuration tests/system.rs boots (file.txt, ssh.txt, token.txt,
# group.txt, substitute.txt), facts
# about the module that need an evaluation (checks.txt), and the sha256 of
# module.nix and render.nix they came from (source.txt). tests/system.rs
# fails when those hashes no longer match: rerun this after editing either.
#
#   tests/system/render.sh /path/to/nixpkgs-lib     # a checkout holding lib/
#
# nixpkgs' lib alone is github:nix-community/nixpkgs.lib. Needs a `nix` that
# can write to its store (evaluation writes the config file there).
set -euo pipefail
cd "$(dirname "$0")/../.."
libdir=${1:?usage: tests/system/render.sh NIXPKGS_LIB_CHECKOUT (the directory holding lib/)}
[ -f "$libdir/lib/default.nix" ] || { echo "render.sh: no lib/default.nix under $libdir" >&2; exit 1; }
out=tests/system/rendered
mkdir -p "$out"
ev() {
    nix --extra-experimental-features nix-command eval --raw \
        -f tests/system/render.nix --arg lib "import $(realpath "$libdir")/lib" "$1"
}
parts=(file ssh token group substitute checks)
for part in "${parts[@]}"; do
    ev "$part" >"$out/$part.txt.new"
done
for part in "${parts[@]}"; do
    mv "$out/$part.txt.new" "$out/$part.txt"
done
{
    echo "# What tests/system/rendered/ was rendered from (tests/system/render.sh)."
    echo "module.nix $(sha256sum module.nix | cut -d' ' -f1)"
    echo "tests/system/render.nix $(sha256sum tests/system/render.nix | cut -d' ' -f1)"
    # The lib's commit, when known (a git checkout, or NIXPKGS_LIB_REV).
    echo "nixpkgs.lib ${NIXPKGS_LIB_REV:-$(git -C "$libdir" rev-parse HEAD 2>/dev/null || echo unknown)}"
} >"$out/source.txt"
echo "rendered into $out"
