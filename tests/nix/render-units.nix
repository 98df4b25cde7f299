# Renders the systemd services that modules/*.nix define into unit files the
# way NixOS writes them (nixos/lib/systemd-lib.nix: `unitConfig`, `serviceConfig`,
# `stage2ServiceConfig`, `serviceToUnit`, `commonUnitText`, `attrsToSection`;
# nixos/modules/system/boot/systemd.nix: `script` becomes a job script). The
# modules are evaluated with the real nixpkgs lib by ./eval-modules.nix; the
# output is what a NixOS machine would have in /etc/systemd/system, so the
# system tier (tests/system/) runs the modules' own units, never hand-written ones.
#
# Result, per unit name ("nixfleet-agent.service"): `text` (the unit file),
# `scripts` (job scripts by file name: NixOS puts them in the store, we let the
# caller write them executable into `scriptDir`) and `wantedBy`. Also `etc`
# (environment.etc targets: file name -> store path) and failed assertions.
{
  lib,
  config ? { },
  packages ? { },
  scriptDir ? "/run/nixfleet-unit-scripts",
  shell ? "/bin/bash",
  # systemd.globalEnvironment: on NixOS, TZDIR and LOCALE_ARCHIVE.
  globalEnvironment ? { },
}:
let
  inherit (lib)
    concatLists
    concatMapStrings
    concatStrings
    concatStringsSep
    isList
    mapAttrs
    mapAttrs'
    mapAttrsToList
    nameValuePair
    optionalAttrs
    optionalString
    ;

  r = import ./eval-modules.nix { inherit lib config packages; };
  inherit (r) eval pkgs;
  systemd = eval.config.systemd.package;

  toOption =
    x:
    if x == true then
      "true"
    else if x == false then
      "false"
    else
      toString x;

  attrsToSection =
    as:
    concatStrings (
      concatLists (
        mapAttrsToList (name: value: map (x: "${name}=${toOption x}\n") (if isList value then value else [ value ])) as
      )
    );

  # Defaults of the NixOS service options the modules may leave unset.
  defaults = {
    description = "";
    documentation = [ ];
    requires = [ ];
    wants = [ ];
    upholds = [ ];
    after = [ ];
    before = [ ];
    bindsTo = [ ];
    partOf = [ ];
    conflicts = [ ];
    requisite = [ ];
    onFailure = [ ];
    onSuccess = [ ];
    wantedBy = [ ];
    path = [ ];
    environment = { };
    unitConfig = { };
    serviceConfig = { };
    script = "";
    scriptArgs = "";
    preStart = "";
    postStart = "";
    restartIfChanged = true;
    reloadIfChanged = false;
    stopIfChanged = true;
  };

  jobScript = name: text: {
    name = builtins.replaceStrings [ "\\" "@" ] [ "-" "_" ] name;
    text = ''
      #!${shell}
      set -e

      ${text}
    '';
  };

  render =
    name: given:
    let
      def = defaults // given;
      list = field: optionalAttrs (def.${field} != [ ]) { ${field} = toString def.${field}; };
      unitConfig =
        mapAttrs' (field: value: nameValuePair (lib.toUpper (lib.substring 0 1 field) + lib.substring 1 (-1) field) value) (
          list "requires"
          // list "wants"
          // list "upholds"
          // list "after"
          // list "before"
          // list "bindsTo"
          // list "partOf"
          // list "conflicts"
          // list "requisite"
          // list "documentation"
          // list "onFailure"
          // list "onSuccess"
        )
        // optionalAttrs (def.description != "") { Description = def.description; }
        // optionalAttrs (given ? startLimitIntervalSec) {
          StartLimitIntervalSec = toString def.startLimitIntervalSec;
        }
        // optionalAttrs (given ? startLimitBurst) { StartLimitBurst = toString def.startLimitBurst; }
        // def.unitConfig;

      # stage2ServiceConfig: every service gets these after its own path.
      path = def.path ++ [
        pkgs.coreutils
        pkgs.findutils
        pkgs.gnugrep
        pkgs.gnused
        systemd
      ];
      environment =
        globalEnvironment
        // {
          PATH = "${lib.makeBinPath path}:${lib.makeSearchPathOutput "bin" "sbin" path}";
        }
        // def.environment;

      pre = jobScript "${name}-pre-start" def.preStart;
      start = jobScript "${name}-start" def.script;
      post = jobScript "${name}-post-start" def.postStart;
      scripts =
        optionalAttrs (def.preStart != "") { ${pre.name} = pre.text; }
        // optionalAttrs (def.script != "") { ${start.name} = start.text; }
        // optionalAttrs (def.postStart != "") { ${post.name} = post.text; };
      serviceConfig =
        optionalAttrs (def.preStart != "") { ExecStartPre = [ "${scriptDir}/${pre.name}" ]; }
        // optionalAttrs (def.script != "") { ExecStart = "${scriptDir}/${start.name} ${def.scriptArgs}"; }
        // optionalAttrs (def.postStart != "") { ExecStartPost = [ "${scriptDir}/${post.name}" ]; }
        // def.serviceConfig;

      text =
        ''
          [Unit]
          ${attrsToSection unitConfig}
        ''
        + ''
          [Service]
        ''
        + concatMapStrings (
          n: optionalString (environment.${n} != null) "Environment=${builtins.toJSON "${n}=${environment.${n}}"}\n"
        ) (builtins.attrNames environment)
        + (
          if def.reloadIfChanged then
            "X-ReloadIfChanged=true\n"
          else if !def.restartIfChanged then
            "X-RestartIfChanged=false\n"
          else
            ""
        )
        + optionalString (!def.stopIfChanged) "X-StopIfChanged=false\n"
        + attrsToSection serviceConfig
        + optionalString (def.wantedBy != [ ]) ''

          [Install]
          WantedBy=${concatStringsSep " " def.wantedBy}
        '';
    in
    {
      inherit text scripts;
      inherit (def) wantedBy;
    };
in
{
  units = mapAttrs' (name: def: nameValuePair "${name}.service" (render name def)) eval.config.systemd.services;
  # NixOS writes `text` entries to the store (pkgs.writeText); builtins.toFile here.
  etc = mapAttrs (
    name: entry: if entry ? source then "${entry.source}" else builtins.toFile (baseNameOf name) entry.text
  ) eval.config.environment.etc;
  inherit (r) failedAssertions warnings;
}
