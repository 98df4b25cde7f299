# A stand-in for nixpkgs, for evaluating this repository's flake.nix offline
# (tests/test_nix_packaging.py passes it with --override-input nixpkgs).
# It builds nothing: every package is a placeholder derivation, and the
# builders record the arguments they are called with, so a test can check
# what flake.nix asks nixpkgs for. Anything not provided here is a missing
# attribute, never a silent fake.
{
  description = "Recording stub of the parts of nixpkgs that nixfleet's flake uses";

  outputs =
    { self }:
    let
      placeholder = name: {
        type = "derivation";
        inherit name;
        outPath = "/nix/store/00000000000000000000000000000000-${name}";
      };

      # A builder that returns a placeholder carrying its arguments.
      recorder =
        kind: nameOf: args:
        placeholder (nameOf args)
        // {
          stub = {
            inherit kind args;
          };
        };

      lib = {
        importTOML = path: builtins.fromTOML (builtins.readFile path);
        makeBinPath = paths: builtins.concatStringsSep ":" (map (p: "${p}/bin") paths);
        licenses.mit.spdxId = "MIT";
        platforms.linux = [
          "aarch64-linux"
          "x86_64-linux"
        ];
      };

      pythonPackageNames = [
        "click"
        "build"
        "falcon"
        "hypothesis"
        "jinja2"
        "jsonschema"
        "mypy"
        "orjson"
        "psycopg"
        "psycopg-pool"
        "pytest"
        "pytestCheckHook"
        "pyyaml"
        "setuptools"
        "tomli-w"
        "types-pyyaml"
        "waitress"
      ];

      pkgsFor =
        system:
        let
          pkgs =
            builtins.listToAttrs (
              map
                (name: {
                  inherit name;
                  value = placeholder name;
                })
                [
                  "curl"
                  "installShellFiles"
                  "jq"
                  "nix"
                  "nixfmt-rfc-style"
                  "ruff"
                  "systemd"
                ]
            )
            // {
              inherit lib;
              stdenv.hostPlatform.system = system;
              callPackage =
                fn: overrides:
                fn (builtins.intersectAttrs (builtins.functionArgs fn) pkgs // overrides);
              inherit python3;
              python3Packages = python3.pkgs;
              mkShell = recorder "mkShell" (_: "shell");
              testers.runNixOSTest = recorder "runNixOSTest" (args: "vm-test-${args.name}");
            };
          python3 = placeholder "python3" // {
            pkgs = pythonPackages;
            withPackages = f: placeholder "python3-env" // { stub.packages = f pythonPackages; };
          };
          pythonPackages =
            builtins.listToAttrs (
              map (name: {
                inherit name;
                value = placeholder name;
              }) pythonPackageNames
            )
            // {
              buildPythonApplication = recorder "buildPythonApplication" (
                args: "${args.pname}-${args.version}"
              );
            };
        in
        pkgs;
    in
    {
      inherit lib;
      legacyPackages = {
        x86_64-linux = pkgsFor "x86_64-linux";
        aarch64-linux = pkgsFor "aarch64-linux";
      };
    };
}
