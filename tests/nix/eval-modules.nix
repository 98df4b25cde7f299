# Evaluates modules/*.nix with a real nixpkgs `lib` (passed in, never
# fetched) outside a full NixOS: the NixOS options the modules set are declared
# here loosely, so types, defaults, assertions and the rendered unit can be
# checked without nixpkgs' package set. Used by tests/nix/test_real_lib.py
# and tests/nix/render-units.nix, with the lib given by NIXFLEET_NIXPKGS_LIB.
# `packages` replaces the fake packages' store paths (nixfleet, nix, systemd,
# coreutils, ...) with real directories, so rendered units can run somewhere.
{
  lib,
  config ? { },
  packages ? { },
}:
let
  inherit (lib) mkOption types;

  # Mirrors nixpkgs' pkgs.formats.json: the value type, and a generator that
  # writes the file (builtins.toFile keeps this free of a stdenv).
  formats.json =
    { }:
    {
      type =
        let
          valueType =
            types.nullOr (
              types.oneOf [
                types.bool
                types.int
                types.float
                types.str
                types.path
                (types.attrsOf valueType)
                (types.listOf valueType)
              ]
            )
            // {
              description = "JSON value";
            };
        in
        valueType;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };

  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = packages.${name} or "/nix/store/00000000000000000000000000000000-${name}";
    meta.mainProgram = name;
  };

  pkgs = {
    inherit formats;
    nixfleet = fakePackage "nixfleet";
    stdenv.hostPlatform.system = builtins.currentSystem;
  }
  // lib.genAttrs [ "coreutils" "findutils" "gnugrep" "gnused" "curl" "jq" ] fakePackage;

  loose =
    default:
    mkOption {
      type = types.anything;
      inherit default;
    };

  nixosStub = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      networking.hostName = mkOption {
        type = types.str;
        default = "web-01";
      };
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      nix.enable = mkOption {
        type = types.bool;
        default = true;
      };
      nix.package = loose (fakePackage "nix");
      nix.settings.trusted-public-keys = mkOption {
        type = types.listOf types.str;
        default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      };
      systemd.package = loose (fakePackage "systemd");
      systemd.services = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      environment.etc = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      # As nixos/modules/system/activation/specialisation.nix declares it; each
      # one is evaluated by extendModules (see ./eval-vm-nodes.nix).
      specialisation = mkOption {
        type = types.attrsOf (
          types.submodule {
            options.configuration = mkOption {
              type = types.deferredModule;
              default = { };
            };
          }
        );
        default = { };
      };
      services.nginx = loose { };
      # The options of nixos/modules/services/databases/postgresql.nix the control
      # plane sets, typed as there: a misspelt name or value fails the evaluation.
      services.postgresql = {
        enable = mkOption {
          type = types.bool;
          default = false;
        };
        ensureDatabases = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        ensureUsers = mkOption {
          type = types.listOf (
            types.submodule {
              options = {
                name = mkOption { type = types.str; };
                ensureDBOwnership = mkOption {
                  type = types.bool;
                  default = false;
                };
                ensureClauses = loose { };
              };
            }
          );
          default = [ ];
        };
      };
    };
  };

  eval = lib.evalModules {
    modules = [
      nixosStub
      ../../modules/agent.nix
      ../../modules/control-plane.nix
      config
    ];
    specialArgs = {
      inherit pkgs;
    };
  };

  # Options of our two services, flattened to "services.x.y" (and
  # "services.x.h.<name>.y" for attribute-set-of-submodule options).
  ours = lib.filter (
    o:
    lib.hasPrefix "services.nixfleet-agent." o.name
    || lib.hasPrefix "services.nixfleet-control-plane." o.name
  ) (lib.optionAttrSetToDocList eval.options);

  # The unit, and the JSON file its ExecStart passes with --config (a path in
  # the store, or one under /etc that environment.etc links into the store).
  etcSource =
    file:
    let
      entry = eval.config.environment.etc.${lib.removePrefix "/etc/" file} or null;
    in
    if lib.hasPrefix "/etc/" file && entry != null then entry.source else file;
  service =
    name:
    let
      unit = eval.config.systemd.services.${name} or null;
      argv = lib.splitString " " unit.serviceConfig.ExecStart;
    in
    if unit == null then
      null
    else
      {
        inherit unit;
        configFile = lib.elemAt argv 2;
        config = builtins.fromJSON (builtins.readFile (etcSource (lib.elemAt argv 2)));
      };
in
{
  options = map (o: {
    inherit (o) name type;
    description = o.description or null;
    default = o.default.text or null;
    example = o.example.text or null;
  }) (lib.filter (o: o.visible && !o.internal) ours);

  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) eval.config.assertions);
  inherit (eval.config) warnings;
  inherit eval pkgs;

  agent = service "nixfleet-agent";
  controlPlane = service "nixfleet-control-plane";
  firewall = eval.config.networking.firewall.allowedTCPPorts;
  nginx = eval.config.services.nginx;
  inherit (eval.config.services) postgresql;
}
