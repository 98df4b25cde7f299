# The NixOS VM tests' nodes (tests/nixos/common.nix) under a real nixpkgs lib,
# without nixpkgs: the flake's own nixosModules (flake.nix, called with a
# nixpkgs that must not be touched) and the fake packages of ./eval-modules.nix,
# which also declares the NixOS options the nodes set (systemd.services,
# environment.etc, specialisation, ...) loosely. What the VM tests would run
# needs full nixpkgs and KVM; this checks the part the module system decides:
# option types, assertions, the agent and control-plane config and units, and
# each specialisation evaluated by extendModules as NixOS's specialisation.nix
# does. Used by tests/nix/test_vm_nodes.py.
{
  lib,
  packages ? { },
}:
let
  system = builtins.currentSystem;
  stub = import ./eval-modules.nix { inherit lib packages; };
  flake = (import ../../flake.nix).outputs {
    self = flake // {
      packages.${system}.default = stub.pkgs.nixfleet;
    };
    nixpkgs = throw "the VM nodes are evaluated without nixpkgs";
  };
  common = import ../nixos/common.nix {
    pkgs.stdenv.hostPlatform.system = system;
    self = flake // {
      packages.${system}.default = stub.pkgs.nixfleet;
    };
  };

  # As the test driver does (nixos/lib/testing/nodes.nix): the node's name is its host name.
  nodeModule = name: {
    imports = [ common.nodes.${name} ];
    networking.hostName = lib.mkDefault name;
  };

  etcText = entry: entry.text or (builtins.readFile entry.source);
  summary =
    config:
    let
      etc = config.environment.etc;
    in
    {
      etc = lib.mapAttrs (_: e: {
        text = etcText e;
        mode = e.mode or "symlink";
      }) (lib.filterAttrs (n: _: !(lib.hasPrefix "nixfleet/" n)) etc);
      services = lib.mapAttrs (_: s: s.serviceConfig or { }) config.systemd.services;
      systemPackages = map (p: p.name) config.environment.systemPackages;
      firewall = config.networking.firewall.allowedTCPPorts;
    };

  evalNode =
    name:
    let
      r = import ./eval-modules.nix {
        inherit lib packages;
        config = nodeModule name;
      };
      specialise =
        spec:
        (r.eval.extendModules {
          modules = [
            { specialisation = lib.mkOverride 0 { }; }
            spec.configuration
          ];
        }).config;
    in
    summary r.eval.config
    // {
      inherit (r) failedAssertions warnings;
      agent = if r.agent == null then null else { inherit (r.agent) config; };
      controlPlane = if r.controlPlane == null then null else { inherit (r.controlPlane) config; };
      specialisations = lib.mapAttrs (_: spec: summary (specialise spec)) r.eval.config.specialisation;
    };
in
{
  inherit (common) prelude;
  nodeNames = builtins.attrNames common.nodes;
  nodes = lib.genAttrs (builtins.attrNames common.nodes) evalNode;
  # The node modules, for ./render-units.nix (`config = (...).nodeModules.cp`).
  nodeModules = lib.genAttrs (builtins.attrNames common.nodes) nodeModule;
}
