{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    optional
    types
    ;

  cfg = config.services.nixfleet-agent;
  format = pkgs.formats.json { };

  stateDir = "/var/lib/nixfleet-agent";

  # Same patterns as the agent's JSON schema (schemas/common.schema.json), so
  # a typo fails at evaluation time instead of in the agent's first poll.
  machineIdPattern = "[A-Za-z0-9][A-Za-z0-9._-]{0,127}";
  tagType = types.strMatching "[A-Za-z0-9][A-Za-z0-9._:-]{0,63}";

  # http:// is only acceptable to a loopback host: anything else would send
  # the machine token in clear text.
  urlParts = builtins.match "([a-z]+)://(\\[[^]]*]|[^]/:[]*)(:[0-9]+)?(/.*)?" cfg.controlPlaneUrl;
  urlScheme = if urlParts == null then null else builtins.elemAt urlParts 0;
  urlHost = if urlParts == null then "" else builtins.elemAt urlParts 1;
  isLoopbackHost =
    urlHost == "localhost"
    || lib.hasSuffix ".localhost" urlHost
    || builtins.match "127\\.[0-9.]+" urlHost != null
    || urlHost == "[::1]";

  httpCheckModule =
    { name, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
          defaultText = literalExpression "<name>";
          description = "Name of the check, as shown in reports and `nixfleet machines show`.";
        };
        url = mkOption {
          type = types.strMatching "https?://.*";
          example = "http://127.0.0.1:8080/healthz";
          description = "URL the agent requests after each switch.";
        };
        expectedStatus = mkOption {
          type = types.ints.between 100 599;
          default = 200;
          description = "HTTP status the response must have for the check to pass.";
        };
        timeout = mkOption {
          type = types.ints.positive;
          default = 5;
          description = "Seconds to wait for the response before the check fails.";
        };
      };
    };

  commandCheckModule =
    { name, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
          defaultText = literalExpression "<name>";
          description = "Name of the check, as shown in reports and `nixfleet machines show`.";
        };
        argv = mkOption {
          type = types.nonEmptyListOf types.str;
          example = literalExpression ''[ "''${pkgs.postgresql}/bin/pg_isready" "-q" ]'';
          description = ''
            Command and arguments, run without a shell; exit status 0 passes.
            It runs inside the agent's sandbox (see the unit's hardening).
          '';
        };
        timeout = mkOption {
          type = types.ints.positive;
          default = 30;
          description = "Seconds the command may run before it is killed and the check fails.";
        };
      };
    };

  # The agent's config file at a path that stays the same across generations:
  # a switch that changes it (tags, checks, ...) is seen by the running agent,
  # which re-reads the file when it changes (restartIfChanged = false means the
  # switch never restarts it). See docs/agent.md, "Configuration changes".
  configPath = "/etc/nixfleet/agent.json";
  configFile = format.generate "nixfleet-agent.json" cfg.settings;
in
{
  options.services.nixfleet-agent = {
    enable = mkEnableOption "the nixfleet agent, which deploys what the control plane assigns";

    package = mkPackageOption pkgs "nixfleet" { };

    controlPlaneUrl = mkOption {
      type = types.str;
      example = "https://fleet.example.com";
      description = ''
        Base URL of the nixfleet control plane. It must be `https://`, except
        for a loopback host or when {option}`services.nixfleet-agent.allowInsecure`
        is set.
      '';
    };

    machineId = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      example = "web-01";
      description = ''
        Id of this machine in the fleet: letters, digits, `.`, `_` and `-`,
        starting with a letter or digit. Release entries are matched on it.
      '';
    };

    tags = mkOption {
      type = types.listOf tagType;
      default = [ ];
      example = [
        "prod"
        "web"
        "region-eu"
      ];
      description = ''
        Tags reported on every poll. The control plane replaces this machine's
        agent-sourced tags with them; operator tags are kept. Rollouts and
        `nixfleet machines list --tags` match machines carrying all given tags.
      '';
    };

    pollInterval = mkOption {
      type = types.ints.positive;
      default = 60;
      description = ''
        Seconds between polls when no rollout is active (with jitter). During a
        rollout the control plane's shorter poll hint is used instead.
      '';
    };

    backoff = {
      initial = mkOption {
        type = types.ints.positive;
        default = 5;
        description = "Seconds before the first retry when the control plane is unreachable.";
      };
      max = mkOption {
        type = types.ints.positive;
        default = 300;
        description = ''
          Upper bound in seconds of the exponential back-off while the control
          plane is unreachable. The machine keeps its generation meanwhile.
        '';
      };
    };

    cacheUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://cache.example.com";
      description = ''
        Binary cache to fetch closures from when the control plane names none.
        With `null`, closures are realised through the system's substituters.
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = config.nix.settings.trusted-public-keys;
      defaultText = literalExpression "config.nix.settings.trusted-public-keys";
      example = [ "cache.example.com-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" ];
      description = ''
        Public keys a fetched closure must be signed with. Unsigned, wrongly
        signed or tampered paths are refused and reported.
      '';
    };

    tokenFile = mkOption {
      type = types.nullOr types.externalPath;
      default = null;
      example = "/run/secrets/nixfleet-token";
      description = ''
        File holding this machine's token (from `nixfleet machines register
        --issue-token`). Passed with systemd's `LoadCredential=`, so it may be
        readable by root only. A path in the world-readable Nix store is
        refused when the configuration is evaluated. Without it, the agent uses the token it obtained by
        enrollment (kept in its state directory).
      '';
    };

    enrollTokenFile = mkOption {
      type = types.nullOr types.externalPath;
      default = null;
      example = "/run/secrets/nixfleet-enroll-token";
      description = ''
        File holding an enrollment token, exchanged once for a machine token
        when the agent has none. Passed with `LoadCredential=`; a path in the
        Nix store is refused when the configuration is evaluated.
      '';
    };

    healthChecks = {
      systemd = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "nginx.service"
          "postgresql.service"
        ];
        description = ''
          Units that must be active after a switch. Whatever is listed here,
          the system must also be `running` or `degraded`.
        '';
      };
      http = mkOption {
        type = types.attrsOf (types.submodule httpCheckModule);
        default = { };
        example = literalExpression ''
          {
            app.url = "http://127.0.0.1:8080/healthz";
          }
        '';
        description = "HTTP checks run after a switch; a failure rolls the machine back.";
      };
      command = mkOption {
        type = types.attrsOf (types.submodule commandCheckModule);
        default = { };
        example = literalExpression ''
          {
            postgres.argv = [ "''${pkgs.postgresql}/bin/pg_isready" "-q" ];
          }
        '';
        description = "Commands run after a switch; a failure rolls the machine back.";
      };
    };

    dryRun = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Poll, fetch and report, but never switch or roll back. Useful to watch a
        rollout plan reach a machine before trusting the agent with it.
      '';
    };

    bootedSystem = mkOption {
      type = types.strMatching "/.*";
      default = "/run/booted-system";
      description = ''
        The system the machine booted. After a switch the agent compares its
        kernel, initrd and kernel modules with the new generation's (as
        {option}`system.autoUpgrade` does) and reports whether a reboot is
        needed; with a rollout's `reboot: when-needed` it then reboots under a
        reboot lease (docs/rollouts.md, "Reboots"). Change it only in tests.
      '';
    };

    rebootCommand = mkOption {
      type = types.nonEmptyListOf (types.strMatching ".+");
      default = [
        "systemctl"
        "reboot"
      ];
      example = [
        "systemctl"
        "kexec"
      ];
      description = ''
        Command and arguments, run without a shell, that reboot the machine
        once the agent holds a reboot lease. It runs from the agent's unit
        (systemd is on its path), through the agent's one subprocess choke point.
      '';
    };

    allowInsecure = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Allow a plain `http://` control plane URL to a non-loopback host. The
        machine token then travels in clear text; meant for test networks.
      '';
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = format.type;
        options = {
          use_systemd_run = mkOption {
            type = types.bool;
            default = true;
            description = ''
              Run `switch-to-configuration` in a transient systemd unit, so the
              switch outlives the agent it may restart and runs outside this
              unit's sandbox. Must stay true on NixOS.
            '';
          };
          profile = mkOption {
            type = types.str;
            default = "/nix/var/nix/profiles/system";
            description = ''
              System profile the agent sets before switching; its directory is
              the only part of the file system the agent's unit may write
              besides its state and cache directories.
            '';
          };
        };
      };
      default = { };
      example = {
        current_system = "/run/current-system";
      };
      description = ''
        The agent's configuration file (`/etc/nixfleet/agent.json`), as
        snake_case keys of `schemas/agent-config.schema.json` (RFC 42). The
        options above are written into it; a key given both here and by an
        option is a conflict at evaluation time, never silently overridden
        (lists, such as `tags`, are concatenated). The agent rejects unknown keys.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion =
          urlScheme == "https" || (urlScheme == "http" && (isLoopbackHost || cfg.allowInsecure));
        message = ''
          services.nixfleet-agent.controlPlaneUrl = "${cfg.controlPlaneUrl}" must be an
          https:// URL (terminate TLS in front of the control plane, e.g. with
          services.nixfleet-control-plane.nginx.enable). Plain http:// is accepted for a
          loopback host, or anywhere with services.nixfleet-agent.allowInsecure = true.
        '';
      }
      {
        assertion = builtins.match machineIdPattern cfg.machineId != null;
        message = ''
          services.nixfleet-agent.machineId = "${cfg.machineId}" is not a valid machine id
          (letters, digits, '.', '_', '-', starting with a letter or digit, at most 128
          characters). Set networking.hostName or services.nixfleet-agent.machineId.
        '';
      }
      {
        assertion = cfg.backoff.initial <= cfg.backoff.max;
        message = ''
          services.nixfleet-agent.backoff.initial (${toString cfg.backoff.initial}) must not
          exceed services.nixfleet-agent.backoff.max (${toString cfg.backoff.max}).
        '';
      }
      {
        assertion = cfg.settings.use_systemd_run;
        message = ''
          services.nixfleet-agent.settings.use_systemd_run must stay true on NixOS: without
          it switch-to-configuration would run inside the agent's sandbox and die with the
          agent when the switch restarts it.
        '';
      }
      {
        assertion = config.nix.enable;
        message = ''
          services.nixfleet-agent needs nix.enable = true: the agent fetches and registers
          closures through the Nix daemon.
        '';
      }
    ];

    services.nixfleet-agent.settings = {
      control_plane_url = cfg.controlPlaneUrl;
      machine_id = cfg.machineId;
      inherit (cfg) tags;
      poll_interval = cfg.pollInterval;
      backoff_initial = cfg.backoff.initial;
      backoff_max = cfg.backoff.max;
      cache_url = cfg.cacheUrl;
      trusted_public_keys = cfg.trustedPublicKeys;
      state_dir = stateDir;
      health_checks = {
        inherit (cfg.healthChecks) systemd;
        http = map (c: {
          inherit (c) name url timeout;
          expected_status = c.expectedStatus;
        }) (lib.attrValues cfg.healthChecks.http);
        command = map (c: { inherit (c) name argv timeout; }) (
          lib.attrValues cfg.healthChecks.command
        );
      };
      dry_run = cfg.dryRun;
      allow_insecure = cfg.allowInsecure;
      booted_system = cfg.bootedSystem;
      reboot_command = cfg.rebootCommand;
    };

    environment.etc."nixfleet/agent.json".source = configFile;

    systemd.services.nixfleet-agent = {
      description = "nixfleet agent";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      # Every fetch and profile change goes through the daemon.
      requires = [ "nix-daemon.socket" ];
      after = [
        "network-online.target"
        "nix-daemon.socket"
      ];
      # NixOS adds coreutils, findutils, grep, sed and systemd to every unit's path.
      path = [ config.nix.package ];

      # The agent runs the switch that activates a new generation. If that
      # switch stopped or restarted this unit, the agent would die before it
      # could run the health checks, roll back and report. The agent is left
      # alone instead; a new agent version starts the next time it exits
      # (Restart=always) or at boot.
      restartIfChanged = false;
      stopIfChanged = false;

      # A fleet agent must never give up for good: the token may be
      # provisioned later and the control plane may be down for hours.
      startLimitIntervalSec = 0;

      environment = {
        # All store writes go through the daemon, so the store itself can stay
        # read-only in this unit's mount namespace.
        NIX_REMOTE = "daemon";
        # ProtectHome hides /root: give Nix a home and a cache it may write.
        HOME = stateDir;
        XDG_CACHE_HOME = "/var/cache/nixfleet-agent";
      };

      serviceConfig = {
        # exec: `systemctl start` fails when the agent cannot be executed.
        Type = "exec";
        ExecStart = "${lib.getExe' cfg.package "nixfleet-agent"} --config ${configPath}";
        Restart = "always";
        RestartSec = 10;

        StateDirectory = "nixfleet-agent";
        StateDirectoryMode = "0700";
        CacheDirectory = "nixfleet-agent";
        CacheDirectoryMode = "0700";
        LoadCredential =
          optional (cfg.tokenFile != null) "token:${cfg.tokenFile}"
          ++ optional (cfg.enrollTokenFile != null) "enroll-token:${cfg.enrollTokenFile}";

        # Hardening. The agent runs as root because it sets the system profile
        # and asks PID 1 (over D-Bus) to run the switch in a transient unit,
        # which is not bound by anything below. Omitted on purpose:
        # - DynamicUser/User, PrivateUsers: the Nix daemon and PID 1 must see
        #   real root (a trusted user, allowed to start units).
        # - MemoryDenyWriteExecute: command health checks run arbitrary
        #   programs in this sandbox, some with JITs.
        # - ProtectProc, ProcSubset: the agent reports /proc/uptime, and
        #   command checks may inspect services' processes.
        # - PrivateNetwork, IPAddressDeny: it polls the control plane, fetches
        #   from caches and runs HTTP checks against arbitrary hosts.
        # - "~@privileged"/"~@resources" syscall groups: the Nix client and
        #   command checks run as root and legitimately use them.
        ProtectSystem = "strict";
        # `nix-env --profile ... --set` and rollbacks write the profile's
        # generation links; everything else in the store goes via the daemon.
        ReadWritePaths = [ (dirOf cfg.settings.profile) ];
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateMounts = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        NoNewPrivileges = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        RemoveIPC = true;
        UMask = "0077";
        # Root without the rest of its capabilities: enough for command
        # checks that read other services' files and sockets or send ICMP.
        CapabilityBoundingSet = [
          "CAP_DAC_OVERRIDE"
          "CAP_DAC_READ_SEARCH"
          "CAP_NET_RAW"
        ];
        # AF_NETLINK: glibc's getaddrinfo asks it which address families the
        # host has before resolving the control plane's name.
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
          "AF_NETLINK"
        ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
