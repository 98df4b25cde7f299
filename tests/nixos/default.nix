# NixOS VM tests: one control plane and two agents on the test network.
# Each agent boots generation "v1" and carries two more as specialisations
# ("v2", and "broken", whose health-checked unit fails), so releases can
# point at real NixOS systems that are already in the VM's store.
{ pkgs, self }:
let
  common = import ./common.nix { inherit pkgs self; };
  mkTest =
    name: testScript:
    pkgs.testers.runNixOSTest {
      name = "nixfleet-${name}";
      inherit (common) nodes;
      testScript = common.prelude + testScript;
    };
in
{
  vm-canary-rollout = mkTest "canary-rollout" (builtins.readFile ./canary-rollout.py);
  vm-failed-generation = mkTest "failed-generation" (builtins.readFile ./failed-generation.py);
  vm-control-plane-down = mkTest "control-plane-down" (builtins.readFile ./control-plane-down.py);
}
