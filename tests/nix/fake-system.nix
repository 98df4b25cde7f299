# A fake NixOS system closure for tests: builds offline in ~0.1 s, no nixpkgs needed.
#
# bin/switch-to-configuration appends "<action> <out>" to $NIXFLEET_SWITCH_LOG (if set)
# and, like NixOS's activation updating /run/current-system, points the link named by
# $NIXFLEET_CURRENT_SYSTEM at itself. With fail = true it does that and then exits 1,
# as a real switch does when a unit fails to start after the activation script ran.
# With healthy = false the system has no `healthy` marker file, which tests' command
# health checks look for. `extra` is shell the switch runs (sourced) after moving the
# link and before failing, e.g. to print a long log or to cut the machine's network.
# With kernel = "k1" it has initrd, kernel and kernel-modules links, as a NixOS system
# does, to (dangling) paths named after k1: two systems with the same kernel compare
# equal, as autoUpgrade's reboot check reads them.
#
# For the system tier (tests/system/): `delay` seconds of sleep make the switch slow;
# `agentConfig` (JSON text) becomes etc/nixfleet/agent.json, which the switch links
# to ${etcDir}/nixfleet/agent.json atomically, as NixOS's /etc activation does;
# `record` names a file the switch appends "begin|end <action> <out> <cgroup>" to,
# which shows that it ran (and finished) in its own transient unit.
{
  salt,
  fail ? false,
  healthy ? true,
  delay ? 0,
  agentConfig ? "",
  etcDir ? "/etc",
  record ? "",
  extra ? "",
  kernel ? "",
}:
builtins.derivation {
  name = "nixos-system-fake-${salt}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  inherit salt agentConfig etcDir record;
  delay = toString delay;
  failSwitch = if fail then "1" else "";
  healthy = if healthy then "1" else "";
  inherit extra;
  inherit kernel;
  args = [ "-c" ''
    set -e
    mkdir -p $out/bin
    echo "$salt" > $out/nixos-version
    if [ -n "$healthy" ]; then echo ok > $out/healthy; fi
    if [ -n "$agentConfig" ]; then
      mkdir -p $out/etc/nixfleet
      printf '%s' "$agentConfig" > $out/etc/nixfleet/agent.json
    fi
    if [ -n "$extra" ]; then printf '%s\n' "$extra" > $out/extra.sh; fi
    if [ -n "$kernel" ]; then
      k=/nix/store/00000000000000000000000000000000-linux-$kernel
      ln -s $k/bzImage $out/kernel
      ln -s $k-initrd/initrd $out/initrd
      ln -s $k-modules/lib $out/kernel-modules
    fi
    cat > $out/bin/switch-to-configuration <<EOS
    #!/bin/sh
    record() { if [ -n "$record" ]; then echo "\$1 \$2 $out \$(tr '\\n' ' ' < /proc/self/cgroup)" >> "$record"; fi; }
    record begin "\$1"
    echo "\$1 $out" >> "\''${NIXFLEET_SWITCH_LOG:-/dev/null}"
    if [ "$delay" != 0 ]; then sleep "$delay"; fi
    if [ -n "$agentConfig" ]; then
      mkdir -p "$etcDir/nixfleet"
      ln -sfn $out/etc/nixfleet/agent.json "$etcDir/nixfleet/.agent.json.tmp"
      mv -Tf "$etcDir/nixfleet/.agent.json.tmp" "$etcDir/nixfleet/agent.json"
    fi
    if [ -n "\$NIXFLEET_CURRENT_SYSTEM" ]; then ln -sfn $out "\$NIXFLEET_CURRENT_SYSTEM"; fi
    record end "\$1"
    if [ -f $out/extra.sh ]; then . $out/extra.sh; fi
    if [ -n "$failSwitch" ]; then echo "warning: the following units failed: fake.service" >&2; exit 1; fi
    exit 0
    EOS
    sed -i 's/^    //' $out/bin/switch-to-configuration
    chmod +x $out/bin/switch-to-configuration
  '' ];
}
