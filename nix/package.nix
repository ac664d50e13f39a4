# The `web` binary, built with crane as a fully static musl executable.
{ pkgs, crane }:
let
  # x86_64-unknown-linux-musl or aarch64-unknown-linux-musl (native, no cross compiler needed)
  target = "${pkgs.stdenv.hostPlatform.parsed.cpu.name}-unknown-linux-musl";

  # Stable Rust from rust-overlay, plus the musl standard library (and extra components).
  toolchainWith =
    extensions: p:
    p.rust-bin.stable.latest.default.override {
      inherit extensions;
      targets = [ target ];
    };
  craneLib = (crane.mkLib pkgs).overrideToolchain (toolchainWith [ ]);

  # Only Cargo.toml, Cargo.lock, *.rs and *.toml: editing docs or Nix files rebuilds nothing.
  src = craneLib.cleanCargoSource ../.;

  commonArgs = {
    inherit src;
    strictDeps = true;
    CARGO_BUILD_TARGET = target;
    CARGO_BUILD_RUSTFLAGS = "-C target-feature=+crt-static";
  };

  # Dependencies alone: rebuilt when Cargo.lock changes, not when src/ does.
  cargoArtifacts = craneLib.buildDepsOnly commonArgs;

  web = craneLib.buildPackage (
    commonArgs
    // {
      inherit cargoArtifacts;
      cargoExtraArgs = "--locked --bin web";
      # The test suite needs redis and postgres; it runs in checks.tests instead.
      doCheck = false;
      meta.mainProgram = "web";
    }
  );
in
{
  inherit
    craneLib
    toolchainWith
    src
    commonArgs
    cargoArtifacts
    web
    ;
}
