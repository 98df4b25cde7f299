{
  description = "nixfleet: declarative fleet manager for NixOS (control plane, agent and CLI)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      # Only builtins up here: nixosModules must evaluate without fetching
      # nixpkgs (tests/test_nix_packaging.py checks that offline).
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f nixpkgs.legacyPackages.${system};
          }) systems
        );

      runtimeDeps =
        ps: with ps; [
          pyyaml
          jsonschema
          tomli-w
          falcon
          waitress
          click
          orjson
          jinja2
        ];
      # pyproject.toml's `postgresql` extra. The package carries it, so that a
      # control plane set to database.url or database.createLocally can open
      # PostgreSQL (SQLite loads none of it).
      postgresqlDeps =
        ps: with ps; [
          psycopg
          psycopg-pool
        ];

      # The package, in callPackage form so the overlay builds it against the
      # user's nixpkgs and the flake against the pinned one.
      nixfleet =
        {
          lib,
          python3Packages,
          installShellFiles,
          nix,
          systemd,
        }:
        python3Packages.buildPythonApplication {
          pname = "nixfleet";
          # One place for the version: pyproject.toml.
          version = (lib.importTOML ./pyproject.toml).project.version;
          pyproject = true;

          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./pyproject.toml
              ./nixfleet
              ./schemas
              ./tests
              # setuptools reads it as the long description.
              (lib.fileset.maybeMissing ./README.md)
            ];
          };

          build-system = [ python3Packages.setuptools ];

          dependencies = runtimeDeps python3Packages ++ postgresqlDeps python3Packages;

          # Shell completion for bash, zsh and fish, from `nixfleet completion SHELL`
          # (run after the wrapper exists, so it finds its dependencies).
          nativeBuildInputs = [ installShellFiles ];
          postFixup = ''
            installShellCompletion --cmd nixfleet \
              --bash <($out/bin/nixfleet completion bash) \
              --zsh <($out/bin/nixfleet completion zsh) \
              --fish <($out/bin/nixfleet completion fish)
          '';

          # The agent fetches, sets profiles and switches with these; --suffix
          # so that on NixOS the system's own nix (the daemon's version) wins.
          makeWrapperArgs = [
            "--suffix"
            "PATH"
            ":"
            (lib.makeBinPath [
              nix
              systemd
            ])
          ];

          nativeCheckInputs = with python3Packages; [
            pytestCheckHook
            hypothesis
          ];

          disabledTestPaths = [
            # These run real Nix (store paths, profiles, flake evaluation),
            # which needs a writable Nix store the build sandbox does not have;
            # the VM tests in `checks` cover the same ground on NixOS.
            "tests/test_nix.py"
            "tests/test_nix_packaging.py"
            "tests/agent/test_activate.py"
            "tests/agent/test_acceptance.py"
            # Builds a wheel with pip in a fresh venv; this derivation is
            # itself that check.
            "tests/test_packaging.py"
            # Drives Debian's chromium through Playwright, neither of which the
            # build has; the HTTP-level dashboard tests (tests/ui/test_pages.py) run.
            "tests/ui/test_browser.py"
          ];

          # The control plane and CLI fall back to ~/.local/state.
          preCheck = ''
            export HOME=$(mktemp -d)
          '';

          pythonImportsCheck = [
            "nixfleet"
            "nixfleet.agent"
            "nixfleet.controlplane"
            "nixfleet.cli"
          ];

          meta = {
            description = "Declarative fleet manager for NixOS: control plane, agent and CLI";
            license = lib.licenses.mit;
            mainProgram = "nixfleet";
            platforms = lib.platforms.linux;
          };
        };

      app = pkg: program: description: {
        type = "app";
        program = "${pkg}/bin/${program}";
        meta = { inherit description; };
      };
    in
    {
      overlays.default = final: _prev: {
        nixfleet = final.callPackage nixfleet { };
      };

      # The modules default their `package` to this flake's build for the
      # host's platform; set it explicitly (or apply overlays.default and use
      # pkgs.nixfleet) to build against your own nixpkgs.
      nixosModules = {
        agent =
          { lib, pkgs, ... }:
          {
            imports = [ ./modules/agent.nix ];
            services.nixfleet-agent.package =
              lib.mkDefault
                self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          };
        control-plane =
          { lib, pkgs, ... }:
          {
            imports = [ ./modules/control-plane.nix ];
            services.nixfleet-control-plane.package =
              lib.mkDefault
                self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          };
        default = {
          imports = [
            self.nixosModules.agent
            self.nixosModules.control-plane
          ];
        };
      };

      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage nixfleet { };
      });

      apps = forAllSystems (
        pkgs:
        let
          pkg = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        in
        {
          default = self.apps.${pkgs.stdenv.hostPlatform.system}.nixfleet;
          nixfleet = app pkg "nixfleet" "nixfleet CLI: fleet status, releases, rollouts";
          nixfleet-control-plane = app pkg "nixfleet-control-plane" "nixfleet control plane server";
          nixfleet-agent = app pkg "nixfleet-agent" "nixfleet agent (run by the NixOS module)";
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (
              ps:
              runtimeDeps ps
              ++ postgresqlDeps ps
              ++ (with ps; [
                pytest
                hypothesis
                mypy
                types-pyyaml
                build
              ])
            ))
            pkgs.ruff
            pkgs.nix
            pkgs.nixfmt-rfc-style
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);

      checks = forAllSystems (
        pkgs:
        let
          tests = import ./tests/nixos {
            inherit pkgs self;
          };
        in
        {
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        }
        // tests
      );
    };
}
