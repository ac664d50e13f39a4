# Everything for one system: a nixpkgs instance with rust-overlay, then the pieces.
{
  system,
  nixpkgs,
  crane,
  rust-overlay,
}:
let
  pkgs = import nixpkgs {
    inherit system;
    overlays = [ rust-overlay.overlays.default ];
  };
  rust = import ./package.nix { inherit pkgs crane; };
  image = import ./image.nix {
    inherit pkgs;
    inherit (rust) web;
  };
in
{
  inherit pkgs image;
  inherit (rust) web sbom;
  checks = import ./checks.nix { inherit pkgs rust image; };
  devShell = import ./shell.nix { inherit pkgs rust; };
}
