# nix develop: the build's Rust toolchain (plus rust-analyzer and rust-src), the services
# the integration tests start (redis-server, initdb/postgres) and the usual tools.
{ pkgs, rust }:
let
  craneLib = rust.craneLib.overrideToolchain (
    rust.toolchainWith [
      "rust-src"
      "rust-analyzer"
    ]
  );
in
# devShell adds cargo, clippy, rustc and rustfmt from the toolchain itself.
craneLib.devShell {
  packages = with pkgs; [
    cargo-nextest
    redis
    postgresql_17
    wrk
    docker-compose
    nixfmt
  ];
}
