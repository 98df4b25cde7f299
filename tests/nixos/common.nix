# Nodes and Python helpers shared by the VM tests in this directory.
{ pkgs, self }:
let
  system = pkgs.stdenv.hostPlatform.system;
  package = self.packages.${system}.default;

  # Throw-away credential of a throw-away VM; never put a real key in the
  # world-readable store like this.
  adminKey = "nixfleet-vm-test-admin-key";

  agent =
    { lib, pkgs, ... }:
    {
      imports = [ self.nixosModules.agent ];

      services.nixfleet-agent = {
        enable = true;
        controlPlaneUrl = "http://cp:8470";
        # The test network has no TLS.
        allowInsecure = true;
        tags = [
          "test"
          "web"
        ];
        pollInterval = 5;
        backoff = {
          initial = 1;
          max = 5;
        };
        # Written by the test once the control plane has issued the token.
        tokenFile = "/var/lib/nixfleet-token";
        healthChecks.systemd = [ "fleet-app.service" ];
      };

      # The "application" whose health decides whether a generation is good.
      systemd.services.fleet-app = {
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${pkgs.coreutils}/bin/true";
        };
      };
      environment.etc."fleet-version".text = lib.mkDefault "v1";

      specialisation = {
        v2.configuration.environment.etc."fleet-version".text = "v2";
        broken.configuration = {
          environment.etc."fleet-version".text = "broken";
          systemd.services.fleet-app.serviceConfig = {
            ExecStart = lib.mkForce "${pkgs.coreutils}/bin/false";
          };
        };
      };
    };
in
{
  nodes = {
    cp =
      { pkgs, ... }:
      {
        imports = [ self.nixosModules.control-plane ];

        services.nixfleet-control-plane = {
          enable = true;
          listen.address = "0.0.0.0";
          openFirewall = true;
          # Secret options refuse store paths; a copied /etc file is outside the store.
          adminKeyFile = "/etc/nixfleet-admin-key";
          settings.reconcile_interval = 1;
        };
        environment.etc."nixfleet-admin-key" = {
          text = adminKey;
          mode = "0400";
        };

        environment.systemPackages = [
          package
          pkgs.curl
          pkgs.jq
        ];
      };
    agent1 = agent;
    agent2 = agent;
  };

  prelude = ''
    ADMIN_KEY = "${adminKey}"
    SYSTEM = "${system}"
  ''
  + builtins.readFile ./prelude.py;
}
