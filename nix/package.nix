# The `web` binary, built with crane as a fully static musl executable.
{ pkgs, crane }:
let
  # x86_64-unknown-linux-musl or aarch64-unknown-linux-musl: the same CPU, so Rust needs no
  # cross toolchain, only the musl standard library (below) ...
  target = "${pkgs.stdenv.hostPlatform.parsed.cpu.name}-unknown-linux-musl";

  # ... but ring (rustls' crypto provider, see src/store/tls.rs) compiles C and assembly for
  # the target with the cc crate. Left alone, cc would take the stdenv's glibc compiler, whose
  # headers and hardening (_FORTIFY_SOURCE: __memcpy_chk & co.) do not belong in a static
  # musl binary. So the C compiler and archiver of pkgsStatic (musl, static) are given to
  # the cc crate for this target only, under the names cc reads (CC_<target>, as crane's
  # mkCrossToolchainEnv sets them for a cross pkgs); build scripts keep the host compiler.
  muslCC = pkgs.pkgsStatic.stdenv.cc;
  ccTarget = builtins.replaceStrings [ "-" ] [ "_" ] target;
  muslCCEnv = {
    "CC_${ccTarget}" = "${muslCC}/bin/${muslCC.targetPrefix}cc";
    "AR_${ccTarget}" = "${muslCC.bintools}/bin/${muslCC.targetPrefix}ar";
  };

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
  }
  // muslCCEnv;

  # Dependencies alone: rebuilt when Cargo.lock changes, not when src/ does.
  cargoArtifacts = craneLib.buildDepsOnly commonArgs;

  # Built by `cargo auditable`, which embeds the dependency list (.dep-v0) that scanners read
  # (`cargo audit bin`, Trivy, Grype); checks.image-contents reads it back (check-image.py).
  web = craneLib.buildPackage (
    commonArgs
    // {
      inherit cargoArtifacts;
      nativeBuildInputs = [ pkgs.rustPackages.cargo-auditable ];
      cargoBuildCommand = "cargo auditable build --profile release";
      cargoExtraArgs = "--locked --bin web";
      # The test suite needs redis and postgres; it runs in checks.tests instead.
      doCheck = false;
      meta.mainProgram = "web";
    }
  );

  # The SBOM of web (nix build .#sbom): CycloneDX JSON from cargo metadata for this target, by
  # cargo-cyclonedx, offline against the crates crane vendored from Cargo.lock.
  sbom = craneLib.mkCargoDerivation (
    commonArgs
    // {
      pname = "web-sbom";
      cargoArtifacts = null;
      doInstallCargoArtifacts = false;
      doCheck = false;
      nativeBuildInputs = [ pkgs.cargo-cyclonedx ];
      buildPhaseCargoCommand = "cargo cyclonedx --format json --target ${target} --override-filename web.cdx";
      installPhaseCommand = "install -Dm444 web.cdx.json $out/web.cdx.json";
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
    sbom
    ;
}
