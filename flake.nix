{
  description = "desafio3: a Rust web service (Redis visit counter + PostgreSQL clock) as a static OCI image";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    crane.url = "github:ipetkov/crane/v0.23.4";
    rust-overlay = {
      url = "github:oxalica/rust-overlay";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      nixpkgs,
      crane,
      rust-overlay,
      ...
    }:
    let
      forAllSystems = nixpkgs.lib.genAttrs [ "x86_64-linux" "aarch64-linux" ];
      perSystem = forAllSystems (system: import ./nix { inherit system nixpkgs crane rust-overlay; });
    in
    {
      # nix build            -> the image tarball (docker load < result)
      # nix build .#web      -> the static binary only
      # nix build .#sbom     -> its SBOM, CycloneDX JSON (result/web.cdx.json)
      packages = forAllSystems (system: {
        inherit (perSystem.${system}) web image sbom;
        default = perSystem.${system}.image;
      });

      # nix flake check      -> build, SBOM, clippy, rustfmt, tests, image contents
      checks = forAllSystems (system: perSystem.${system}.checks);

      # nix develop          -> toolchain, rust-analyzer, redis, postgresql, ...
      devShells = forAllSystems (system: {
        default = perSystem.${system}.devShell;
      });

      # nix fmt
      formatter = forAllSystems (system: perSystem.${system}.pkgs.nixfmt-tree);
    };
}
