# nix flake check: the build, the SBOM, clippy (-D warnings), rustfmt, the test suite, and two
# checks that the image holds nothing but the binary (with its dependency list), the CA bundle
# and passwd/group.
{
  pkgs,
  rust,
  image,
}:
let
  inherit (rust)
    craneLib
    commonArgs
    cargoArtifacts
    src
    web
    sbom
    ;
  # The tests, and clippy over them, also read files that are not Rust: the documents they hold
  # to the code (*.md, the compose file and manifests, the monitoring rules and dashboard), and
  # Redis's counting functions with the cache healthcheck that loads them (*.lua, *.sh).
  testSrc = pkgs.lib.cleanSourceWith {
    src = ../.;
    filter =
      path: type:
      craneLib.filterCargoSources path type
      || pkgs.lib.any (suffix: pkgs.lib.hasSuffix suffix path) [
        ".md"
        ".yaml"
        ".yml"
        ".json"
        ".lua"
        ".sh"
      ];
  };
in
{
  inherit web image sbom;

  clippy = craneLib.cargoClippy (
    commonArgs
    // {
      inherit cargoArtifacts;
      src = testSrc;
      cargoClippyExtraArgs = "--all-targets -- --deny warnings";
    }
  );

  fmt = craneLib.cargoFmt { inherit src; };

  # `cargo test`: the integration tests start their own redis-server and
  # PostgreSQL (initdb, postgres) from PATH, on free loopback ports.
  tests = craneLib.cargoTest (
    commonArgs
    // {
      inherit cargoArtifacts;
      src = testSrc;
      nativeCheckInputs = [
        pkgs.redis
        pkgs.postgresql_17
      ];
    }
  );

  # Static and self-contained: the binary's runtime closure is the binary alone.
  web-closure = pkgs.runCommand "web-closure-is-only-web" { } ''
    paths=$(cat ${pkgs.closureInfo { rootPaths = [ web ]; }}/store-paths)
    if [ "$paths" != "${web}" ]; then
      echo "the runtime closure of web is more than web itself:" >&2
      echo "$paths" >&2
      exit 1
    fi
    touch $out
  '';

  # Exactly the files, modes and config of image-facts.json; no /nix/store, no symlinks; the
  # binary's embedded dependency list (cargo auditable) as in Cargo.lock.
  image-contents =
    pkgs.runCommand "image-contents" { nativeBuildInputs = [ pkgs.python3 ]; }
      ''
        python3 ${./check-image.py} ${./image-facts.json} ${image} --cargo-dir=${src}
        touch $out
      '';
}
