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

  cfg = config.services.nixfleet-control-plane;
  format = pkgs.formats.json { };

  stateDir = "/var/lib/nixfleet";
  unit = "nixfleet-control-plane.service";
  # systemd's fixed $CREDENTIALS_DIRECTORY for the unit: settings files get no `%d`.
  credentials = "/run/credentials/${unit}";

  db = cfg.database;
  hasPrefixes = prefixes: url: lib.any (p: lib.hasPrefix p (lib.toLower url)) prefixes;
  isPostgres = url: url != null && hasPrefixes [ "postgresql://" "postgres://" ] url;
  isSqlite = url: url != null && hasPrefixes [ "sqlite:" ] url;
  # As nixfleet/database_url.py refuses it: user:password@ in the authority, or
  # `password=` in the query. Caught here so that it never reaches the store.
  holdsPassword =
    url:
    isPostgres url
    && (
      builtins.match "[^:]*://[^/?#@]*:[^/?#@]*@.*" url != null
      || builtins.match "[^?]*[?](.*&)?password=.*" url != null
    );
  namesPassfile = url: builtins.match "[^?]*[?](.*&)?passfile=.*" url != null;
  # Peer authentication over the socket: the unit's user name is the role.
  localUrl = "postgresql:///nixfleet?host=/run/postgresql";
  localServer = [
    "postgresql.service"
    "postgresql.target"
  ];
  databaseUrl =
    if db.createLocally then
      localUrl
    else if db.url != null && db.passwordFile != null then
      "${db.url}${if lib.hasInfix "?" db.url then "&" else "?"}passfile=${credentials}/pgpass"
    else
      db.url;

  inherit (cfg.listen) address port;
  bracket = host: if lib.hasInfix ":" host then "[${host}]" else host;
  # nginx reaches a wildcard listener through loopback.
  proxyHost =
    if address == "0.0.0.0" then
      "127.0.0.1"
    else if address == "::" then
      "[::1]"
    else
      bracket address;

  # Only keys the control plane knows; `settings` is merged over them. The
  # admin key is passed as a flag pointing into $CREDENTIALS_DIRECTORY.
  cpConfig = lib.recursiveUpdate (
    {
      listen = "${bracket address}:${toString port}";
      history_days = cfg.historyDays;
      history_max_events = cfg.historyMaxEvents;
      ui = cfg.ui.enable;
    }
    # No database URL: the SQLite file in the state directory, spelled as always.
    // (
      if databaseUrl == null then
        { db = "${stateDir}/nixfleet.db"; }
      else
        { database_url = databaseUrl; }
    )
    // lib.optionalAttrs (cfg.rolloutsDir != null) { rollouts_dir = "${cfg.rolloutsDir}"; }
    # Behind nginx with forced TLS, dashboard cookies are Secure.
    // lib.optionalAttrs (cfg.nginx.enable && cfg.nginx.forceSSL) { ui_secure_cookie = true; }
    // lib.optionalAttrs (cfg.webhooks != [ ]) {
      # Each secret is a credential of the unit, at systemd's fixed path for it.
      webhooks = lib.imap0 (i: w: {
        inherit (w) url events;
        secret_file = "${credentials}/webhook-${toString i}";
      }) cfg.webhooks;
    }
  ) cfg.settings;
  webhookCredentials = lib.imap0 (
    i: w: "webhook-${toString i}:${w.secretFile}"
  ) cfg.webhooks;

  configFile = format.generate "nixfleet-control-plane.json" cpConfig;
in
{
  options.services.nixfleet-control-plane = {
    enable = mkEnableOption "the nixfleet control plane, which drives the fleet's rollouts";

    package = mkPackageOption pkgs "nixfleet" { };

    listen = {
      address = mkOption {
        type = types.str;
        default = "127.0.0.1";
        example = "0.0.0.0";
        description = ''
          Address the API listens on (IPv6 without brackets, e.g. `::1`; `0.0.0.0`
          or `::` for all). It speaks plain HTTP: keep it on loopback behind
          {option}`services.nixfleet-control-plane.nginx.enable`, or otherwise
          terminate TLS in front of it.
        '';
      };
      port = mkOption {
        type = types.port;
        default = 8470;
        description = ''
          TCP port the API listens on; the one
          {option}`services.nixfleet-control-plane.openFirewall` opens.
        '';
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open {option}`services.nixfleet-control-plane.listen.port` in the
        firewall, or ports 80 and 443 instead when the nginx proxy is enabled.
      '';
    };

    adminKeyFile = mkOption {
      type = types.nullOr types.externalPath;
      default = null;
      example = "/run/secrets/nixfleet-admin-key";
      description = ''
        File holding the first admin API key, accepted by the control plane
        from start-up. Passed with systemd's `LoadCredential=`, so it may be
        readable by root only; a path in the world-readable Nix store is
        refused when the configuration is evaluated.
      '';
    };

    database = {
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "postgresql://nixfleet@db.example.com/nixfleet?sslmode=verify-full";
        description = ''
          The database the control plane keeps the fleet in (its `database_url`
          setting). `null`: the SQLite file `/var/lib/nixfleet/nixfleet.db` in the
          state directory. Otherwise `postgresql://USER@HOST[:PORT]/DATABASE` with
          libpq's query parameters (`sslmode`, `host=/run/postgresql` for a socket,
          …), or `sqlite:PATH` (the unit can write only under `/var/lib/nixfleet`).
          The URL lands in the world-readable Nix store and may hold no password:
          use {option}`services.nixfleet-control-plane.database.passwordFile`, or
          {option}`services.nixfleet-control-plane.database.createLocally`.
        '';
      };

      passwordFile = mkOption {
        type = types.nullOr types.externalPath;
        default = null;
        example = "/run/secrets/nixfleet-pgpass";
        description = ''
          libpq password file for the `postgresql://` URL of
          {option}`services.nixfleet-control-plane.database.url`: lines of
          `host:port:database:user:password` (`*` matches anything; escape `:` and
          `\` in the password with `\`), e.g. `*:*:nixfleet:nixfleet:s3cret`; a
          bare password is not read. Passed with systemd's `LoadCredential=` and
          appended to the URL as `passfile=$CREDENTIALS_DIRECTORY/pgpass`, so it may
          be readable by root only; a path in the Nix store is refused.
        '';
      };

      createLocally = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Run PostgreSQL on this machine (`services.postgresql`) with a database
          and role `nixfleet` that owns it, and connect to it over the socket
          (`postgresql:///nixfleet?host=/run/postgresql`) by peer authentication,
          no password. The unit then runs as the dynamic user `nixfleet`, the
          name peer authentication maps to the role, and requires and starts
          after `postgresql.service` and `postgresql.target` (the latter includes
          `postgresql-setup.service`, which creates the role and database).
        '';
      };
    };

    rolloutsDir = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = literalExpression "./rollouts";
      description = ''
        Directory of rollout files (YAML, see `schemas/rollout.schema.json`)
        the control plane applies; re-applying an unchanged file is a no-op.
      '';
    };

    ui.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Serve the web dashboard under `/ui` (log in with an operator API key).
        When false, the control plane serves no `/ui` route at all.
      '';
    };

    webhooks = mkOption {
      type = types.listOf (
        types.submodule {
          options = {
            url = mkOption {
              type = types.str;
              example = "https://hooks.example.com/nixfleet";
              description = "Where events are POSTed (`http://` or `https://`).";
            };
            events = mkOption {
              type = types.listOf types.str;
              default = [ "*" ];
              example = [
                "rollout.failed"
                "machine.failed"
              ];
              description = ''
                Events sent to this receiver (see docs/webhooks.md), or `"*"` for all.
              '';
            };
            secretFile = mkOption {
              type = types.path;
              example = "/run/secrets/nixfleet-webhook";
              description = ''
                File holding the HMAC-SHA256 secret the bodies are signed with.
                Passed with systemd's `LoadCredential=`; must not be in the Nix store.
              '';
            };
          };
        }
      );
      default = [ ];
      description = ''
        Webhook receivers: signed JSON POSTs of rollout and machine events, from a
        durable outbox, retried with back-off for 24 hours (docs/webhooks.md).
      '';
    };

    historyDays = mkOption {
      type = types.ints.positive;
      default = 90;
      description = "Days of machine history (changes, not heartbeats) kept; older events are pruned in the background.";
    };

    historyMaxEvents = mkOption {
      type = types.ints.positive;
      default = 1000;
      description = "History events kept per machine at most; the oldest beyond it are pruned in the background.";
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = format.type;
        options = {
          reconcile_interval = mkOption {
            type = types.ints.positive;
            default = 2;
            description = "Seconds between two reconciler ticks.";
          };
          threads = mkOption {
            type = types.ints.positive;
            default = 8;
            description = "Worker threads of the HTTP server.";
          };
          workers = mkOption {
            type = types.ints.between 1 64;
            default = 1;
            description = ''
              Server processes accepting on the same socket; the reconciler runs in
              the first. One CPython process uses about one core, so for fleets that
              report more than ~1,000 times a second, set this to the number of cores.
            '';
          };
        };
      };
      default = { };
      example = {
        threads = 16;
        stale_after = 600;
      };
      description = ''
        Further control plane settings (snake_case keys), merged over the ones
        generated from the options above. Unknown keys are rejected at start.
      '';
    };

    nginx = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Put an nginx virtual host in front of the control plane, terminating
          TLS and proxying to {option}`services.nixfleet-control-plane.listen.port`.
          Further settings can go to
          `services.nginx.virtualHosts.<virtualHost>` directly.
        '';
      };
      virtualHost = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "fleet.example.com";
        description = "Server name of the nginx virtual host; required with the proxy.";
      };
      enableACME = mkOption {
        type = types.bool;
        default = false;
        description = "Passed to the virtual host's `enableACME`: obtain a certificate with ACME.";
      };
      forceSSL = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Passed to the virtual host's `forceSSL`: redirect HTTP to HTTPS. Needs
          a certificate (`enableACME`, or `sslCertificate`/`sslCertificateKey`
          on the virtual host).
        '';
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.nginx.enable -> cfg.nginx.virtualHost != null;
        message = ''
          services.nixfleet-control-plane.nginx.enable needs
          services.nixfleet-control-plane.nginx.virtualHost, e.g. "fleet.example.com".
        '';
      }
      {
        assertion = db.createLocally -> db.url == null;
        message = ''
          services.nixfleet-control-plane.database.createLocally connects to the local
          PostgreSQL by itself (postgresql:///nixfleet?host=/run/postgresql): unset
          services.nixfleet-control-plane.database.url, or set createLocally = false.
        '';
      }
      {
        assertion = db.passwordFile != null -> isPostgres db.url;
        message = ''
          services.nixfleet-control-plane.database.passwordFile needs
          services.nixfleet-control-plane.database.url to be a postgresql:// URL
          (createLocally connects by peer authentication, with no password).
        '';
      }
      {
        assertion = db.url == null || isPostgres db.url || isSqlite db.url;
        message = ''
          services.nixfleet-control-plane.database.url must be a postgresql:// URL
          or sqlite:PATH, not "${toString db.url}".
        '';
      }
      {
        assertion = !holdsPassword db.url;
        message = ''
          services.nixfleet-control-plane.database.url holds a password, which would
          be world-readable in the Nix store: remove it and put it in the file that
          services.nixfleet-control-plane.database.passwordFile names.
        '';
      }
      {
        assertion = db.passwordFile != null && db.url != null -> !namesPassfile db.url;
        message = ''
          services.nixfleet-control-plane.database.url names a passfile= already;
          drop it: services.nixfleet-control-plane.database.passwordFile appends one.
        '';
      }
    ];

    services.postgresql = mkIf db.createLocally {
      enable = true;
      ensureDatabases = [ "nixfleet" ];
      ensureUsers = [
        {
          name = "nixfleet";
          ensureDBOwnership = true;
        }
      ];
    };

    # Behind nginx, clients only ever talk to nginx.
    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall (
      if cfg.nginx.enable then
        [
          80
          443
        ]
      else
        [ port ]
    );

    services.nginx = mkIf cfg.nginx.enable {
      enable = true;
      virtualHosts.${cfg.nginx.virtualHost} = {
        inherit (cfg.nginx) enableACME forceSSL;
        locations."/" = {
          proxyPass = "http://${proxyHost}:${toString port}";
          recommendedProxySettings = true;
          # The API refuses bodies over 1 MiB itself; stop them here first.
          extraConfig = ''
            client_max_body_size 1m;
          '';
        };
      };
    };

    systemd.services.nixfleet-control-plane = {
      description = "nixfleet control plane";
      wantedBy = [ "multi-user.target" ];
      # postgresql.target is up once postgresql-setup.service has run the
      # ensure* scripts: the role exists before the first connection.
      after = [ "network.target" ] ++ lib.optionals db.createLocally localServer;
      requires = lib.optionals db.createLocally localServer;

      serviceConfig = {
        # exec: `systemctl start` fails when the server cannot be executed.
        Type = "exec";
        # %d is $CREDENTIALS_DIRECTORY: the key never appears on the command line.
        ExecStart = lib.concatStringsSep " " (
          [
            (lib.getExe' cfg.package "nixfleet-control-plane")
            "--config"
            "${configFile}"
          ]
          ++ lib.optionals (cfg.adminKeyFile != null) [
            "--admin-key-file"
            "%d/admin-key"
          ]
        );
        # The unit is started (and `nixos-rebuild switch` succeeds) only once
        # GET /ready is 200: migrated, and the database takes a real write.
        # Within TimeoutStartSec's default 90 s; else the start fails and is retried.
        ExecStartPost = lib.concatStringsSep " " [
          (lib.getExe' cfg.package "nixfleet-control-plane")
          "--config"
          "${configFile}"
          "wait-ready"
          "--timeout"
          "60"
        ];
        Restart = "on-failure";
        RestartSec = 5;

        DynamicUser = true;
        # Peer authentication maps the OS user name to the role; otherwise systemd
        # names the dynamic user after the unit, as it always did.
        User = mkIf db.createLocally "nixfleet";
        StateDirectory = "nixfleet";
        StateDirectoryMode = "0700";
        LoadCredential =
          optional (cfg.adminKeyFile != null) "admin-key:${cfg.adminKeyFile}"
          ++ optional (db.passwordFile != null) "pgpass:${db.passwordFile}"
          ++ webhookCredentials;

        # Binding a port below 1024 is the only privilege it may need.
        CapabilityBoundingSet = if port < 1024 then [ "CAP_NET_BIND_SERVICE" ] else "";
        AmbientCapabilities = if port < 1024 then [ "CAP_NET_BIND_SERVICE" ] else "";

        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateMounts = true;
        # A user namespace would confine CAP_NET_BIND_SERVICE to itself.
        PrivateUsers = port >= 1024;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        NoNewPrivileges = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        UMask = "0077";
        DevicePolicy = "closed";
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
          "~@resources"
        ];
      };
    };
  };
}
