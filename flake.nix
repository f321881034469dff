# A thin wrapper: everything real lives in default.nix and module.nix, which
# non-flake users import directly.
{
  description = "A Nix post-build-hook that returns at once and a daemon that signs and uploads built paths in batches";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      forAllSystems = nixpkgs.lib.genAttrs [
        "x86_64-linux"
        "aarch64-linux"
      ];
    in
    {
      overlays.default = final: prev: {
        nix-post-build-hook-queue = final.callPackage ./default.nix { };
      };

      packages = forAllSystems (system: {
        default = nixpkgs.legacyPackages.${system}.callPackage ./default.nix { };
      });

      nixosModules.default = ./module.nix;
    };
}
