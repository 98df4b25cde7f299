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
{ salt, fail ? false, healthy ? true, extra ? "", kernel ? "" }:
builtins.derivation {
  name = "nixos-system-fake-${salt}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  inherit salt;
  failSwitch = if fail then "1" else "";
  healthy = if healthy then "1" else "";
  inherit extra;
  inherit kernel;
  args = [ "-c" ''
    set -e
    mkdir -p $out/bin
    echo "$salt" > $out/nixos-version
    if [ -n "$healthy" ]; then echo ok > $out/healthy; fi
    if [ -n "$extra" ]; then printf '%s\n' "$extra" > $out/extra.sh; fi
    if [ -n "$kernel" ]; then
      k=/nix/store/00000000000000000000000000000000-linux-$kernel
      ln -s $k/bzImage $out/kernel
      ln -s $k-initrd/initrd $out/initrd
      ln -s $k-modules/lib $out/kernel-modules
    fi
    cat > $out/bin/switch-to-configuration <<EOS
    #!/bin/sh
    echo "\$1 $out" >> "\''${NIXFLEET_SWITCH_LOG:-/dev/null}"
    if [ -n "\$NIXFLEET_CURRENT_SYSTEM" ]; then ln -sfn $out "\$NIXFLEET_CURRENT_SYSTEM"; fi
    if [ -f $out/extra.sh ]; then . $out/extra.sh; fi
    if [ -n "$failSwitch" ]; then echo "warning: the following units failed: fake.service" >&2; exit 1; fi
    exit 0
    EOS
    sed -i 's/^    //' $out/bin/switch-to-configuration
    chmod +x $out/bin/switch-to-configuration
  '' ];
}
