# A fleet flake without inputs for `nixfleet release create` tests: each host's
# config.system.build.toplevel is a fake NixOS system that real Nix builds offline in
# a moment (no nixpkgs). `salt` (a file the test writes before committing) keeps store
# paths fresh per test, so "--eval-only does not build" can be checked.
{
  outputs = { self }:
    let
      salt = builtins.readFile ./salt;
      # Pure evaluation has no currentSystem; the tests run on x86_64-linux builders.
      system = builtins.currentSystem or "x86_64-linux";
      host = name: tags: {
        config = {
          nixpkgs.hostPlatform.system = system;
          services.nixfleet-agent.tags = tags;
          system.build.toplevel = builtins.derivation {
            name = "nixos-system-${name}";
            inherit system salt;
            builder = "/bin/sh";
            PATH = "/usr/bin:/bin";
            args = [ "-c" ''
              mkdir -p $out/bin
              echo "${name} $salt" > $out/nixos-version
              printf '#!/bin/sh\necho "switch-to-configuration $1 (${name})"\n' \
                > $out/bin/switch-to-configuration
              chmod +x $out/bin/switch-to-configuration
            '' ];
          };
        };
      };
    in {
      nixosConfigurations = {
        web-01 = host "web-01" [ "web" "prod" ];
        web-02 = host "web-02" [ "web" "prod" ];
        db-01 = host "db-01" [ "db" "prod" ];
        # No agent options at all: tags default to [], platform to the toplevel's system.
        lab-01 = {
          config.system.build.toplevel = (host "lab-01" [ ]).config.system.build.toplevel;
        };
      };
    };
}
