# The image desafio3-web:latest. Its only files: /bin/web, the CA bundle, /etc/passwd,
# /etc/group and an empty /tmp. The files are copied, not symlinked, so the image has no
# /nix/store at all. Every fact comes from image-facts.json, which the built image (and the
# fallback Dockerfile's) is checked against (nix/check-image.py).
{ pkgs, web }:
let
  inherit (pkgs) lib;
  facts = lib.importJSON ./image-facts.json;

  sources = {
    binary = "${web}/bin/web";
    ca-bundle = "${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt";
  };

  # extraCommands runs in the image's root directory, hence the leading "."
  mkFile =
    path: spec:
    (
      if spec ? content then
        "printf '%s' ${lib.escapeShellArg spec.content} > .${path}"
      else
        "cp ${sources.${spec.source}} .${path}"
    )
    + "\nchmod ${spec.mode} .${path}";
  mkDir = path: spec: "mkdir -p .${path}\nchmod ${spec.mode} .${path}";
  parents = lib.unique (map (p: ".${dirOf p}") (builtins.attrNames facts.files));
in
pkgs.dockerTools.buildLayeredImage {
  inherit (facts) name tag created;
  extraCommands = ''
    mkdir -p ${lib.concatStringsSep " " parents}
    ${lib.concatStringsSep "\n" (lib.mapAttrsToList mkFile facts.files)}
    ${lib.concatStringsSep "\n" (lib.mapAttrsToList mkDir facts.dirs)}
  '';
  config = {
    Entrypoint = facts.entrypoint;
    User = facts.user;
    ExposedPorts = lib.genAttrs facts.exposedPorts (_: { });
    Env = facts.env;
  };
}
