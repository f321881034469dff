# NixOS module: services.nix-post-build-hook-queue
#
# Without flakes:  imports = [ "${nix-post-build-hook-queue-src}/module.nix" ];
# With flakes:     imports = [ nix-post-build-hook-queue.nixosModules.default ];
#
# Nix runs `post-build-hook` (from `package`) as root after every local build;
# it hands the built paths to the daemon over /run/nix-post-build-hook-queue.sock
# and exits at once. The daemon (socket activated, unprivileged, sandboxed)
# journals them, signs them (`nix store sign`) and uploads them (`nix copy`).
# Its config file is checked by the daemon itself when the system is built
# (`checkConfig`): a bad setting fails `nixos-rebuild build`, not the switch.
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
    optionals
    types
    ;

  cfg = config.services.nix-post-build-hook-queue;

  name = "nix-post-build-hook-queue";
  defaultUser = name;
  # Both are also the built-in defaults of the client and the daemon when run
  # as root, so the hook needs no environment: keep them fixed.
  stateDir = "/var/lib/${name}";
  socketPath = "/run/${name}.sock";

  sshConnectTimeout = 10;

  # The daemon gives the nix call in progress this long to finish after
  # SIGTERM (src/server.rs STOP_GRACE), then kills it. systemd must wait
  # longer than that before it kills everything itself.
  daemonStopGrace = 10;
  stopTimeout = daemonStopGrace + 20;

  # pkgs.nix-post-build-hook-queue when an overlay (or nixpkgs) has it, else
  # the package beside this module.
  pkgsWithPackage = pkgs // {
    ${name} = pkgs.${name} or (pkgs.callPackage ./default.nix { });
  };

  # Key paths are used as strings. toString of an absolute path literal is
  # its path and does NOT copy the file into the store (interpolating the
  # path literal, "${/some/key}", would).
  keyPath = p: if p == null then null else toString p;
  signingKey = keyPath cfg.signingPrivateKeyPath;
  sshKey = keyPath cfg.sshPrivateKeyPath;
  inStore = p: p != null && lib.hasPrefix "${builtins.storeDir}/" p;

  environmentFile = keyPath cfg.environmentFile;

  # A secret in the store would be world-readable: refuse it, saying why.
  keyOutsideStore = option: key: example: {
    assertion = !inStore key;
    message = ''
      services.nix-post-build-hook-queue.${option} (${toString key})
      is in the Nix store. Everything in the store is world-readable and is
      copied along with the system closure, so what it holds would no longer
      be secret. Use a quoted absolute path to a file outside the store, e.g.
      ${option} = "/run/secrets/${example}";
      (a sops-nix or agenix secret), and make a new secret.
    '';
  };

  # Every target URL (uploadTo merges strings and lists into one list).
  uploads = cfg.uploadTo;
  uploadCommand = cfg.settings.upload-command;
  uploadProgram = if uploadCommand == null then "/" else builtins.head uploadCommand;
  schemeOf =
    url:
    if lib.hasPrefix "/" url then
      "local"
    else
      builtins.head (lib.splitString "?" (builtins.head (lib.splitString "://" url)));
  uploadSchemes = map schemeOf uploads;
  # Store URLs that never leave the machine: no AF_INET needed.
  isLocalScheme =
    scheme:
    builtins.elem scheme [
      "file"
      "local"
      "unix"
      "daemon"
      "auto"
    ];
  # The upload-command may reach any host.
  needsInet =
    builtins.any (s: !isLocalScheme s) uploadSchemes || uploadCommand != null;
  uploadIsSsh = builtins.any (
    s:
    builtins.elem s [
      "ssh"
      "ssh-ng"
    ]
  ) uploadSchemes;
  # Directories `nix copy` writes into for file:// and local chroot stores.
  uploadDirs = map (url: builtins.head (lib.splitString "?" (lib.removePrefix "file://" url))) (
    builtins.filter (url: schemeOf url == "file" || lib.hasPrefix "/" url) uploads
  );

  metricsFile = keyPath cfg.settings.metrics-file;
  metricsDir = if metricsFile == null then null else dirOf metricsFile;

  # The nix-daemon decides whether this user may sign (see the assertion).
  nixVersion = lib.getVersion config.nix.package;
  nixLetsAnyUserSign = lib.versionAtLeast nixVersion "2.17";
  trustedUsers = config.nix.settings.trusted-users or [ "root" ];
  userIsTrusted =
    builtins.elem cfg.user trustedUsers
    || builtins.elem "@${cfg.group}" trustedUsers
    || builtins.elem "*" trustedUsers;

  # nix-daemon signs at build time with these keys (see signingPrivateKeyPath).
  nixDaemonSigns = (config.nix.settings.secret-key-files or [ ]) != [ ];

  # A `user` the configuration declares a normal (login) account elsewhere
  # is not the module's: it is left as it is, not made a system user.
  userIsNormal = config.users.users.${cfg.user}.isNormalUser or false;

  # Keys the module sets itself (or that must not move); settings may not.
  moduleOwnedKeys = {
    signing-key-file = "set services.nix-post-build-hook-queue.signingPrivateKeyPath instead (the key reaches the daemon as a systemd credential)";
    upload-to = "set services.nix-post-build-hook-queue.uploadTo instead";
    state-dir = "the state directory is fixed to ${stateDir} (StateDirectory=, and the hook's spool default)";
    spool-dir = "the hook, run as root by the Nix daemon, spools to ${stateDir}/spool; a different spool-dir would never be read";
    socket = "the socket is fixed to ${socketPath} (the socket unit; the hook's default)";
    socket-mode = "the socket unit creates the socket: set systemd.sockets.${name}.socketConfig.SocketMode";
    socket-group = "the socket unit creates the socket: set services.nix-post-build-hook-queue.socketGroup";
  };

  # The config file: nix.conf syntax, one `key = value` per line, sorted by
  # key. Booleans are true/false, lists are space separated, paths are
  # written as their absolute path (not copied to the store), null means
  # "not set" and writes no line. The daemon cuts each line at the first `#`
  # and trims the value, so values may hold neither `#` nor a newline
  # (checked by an assertion).
  # Floats go through toJSON, which writes the shortest text that reads back
  # as the same number (2.5, 1e-07); toString would write six fixed decimals
  # (2.500000, and 0.000000 for 1e-7, which the daemon refuses).
  renderValue =
    v:
    if builtins.isBool v then
      lib.boolToString v
    else if builtins.isList v then
      lib.concatStringsSep " " v
    else if builtins.isFloat v then
      builtins.toJSON v
    else
      toString v;
  fileSettings = lib.filterAttrs (k: v: v != null && !(moduleOwnedKeys ? ${k})) cfg.settings;
  # upload-to is a list: one `upload-to =` line per target, which the
  # daemon reads as several targets.
  renderedValues =
    lib.mapAttrs (_: renderValue) fileSettings
    // lib.optionalAttrs (uploads != [ ]) { upload-to = uploads; };
  configText =
    "# ${name} configuration, generated by module.nix\n"
    + lib.concatStrings (
      lib.concatLists (
        lib.mapAttrsToList (k: v: map (line: "${k} = ${line}\n") (lib.toList v)) renderedValues
      )
    );
  daemonProgram = "${cfg.package}/bin/post-build-hook-queue";
  uncheckedConfigFile = pkgs.writeText "${name}.conf" configText;
  # The daemon's own check of the file (`check-config`: exit 78 and one line
  # per problem), run where the system is built, so that a bad setting fails
  # `nixos-rebuild build` rather than the service at the switch. The same
  # flags as ExecStart but the credential, which exists only at run time.
  # What needs the running system (the key file, reaching a target) is
  # checked when the service starts.
  configFile =
    if cfg.checkConfig && pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform then
      pkgs.runCommand "${name}.conf"
        {
          unchecked = uncheckedConfigFile;
          preferLocalBuild = true;
        }
        ''
          ${daemonProgram} check-config --config "$unchecked" --state-dir ${stateDir}
          cp "$unchecked" "$out"
        ''
    else
      uncheckedConfigFile;
  badValues = lib.filterAttrs (
    _: v:
    builtins.any (x: lib.hasInfix "#" x || lib.hasInfix "\n" x || lib.hasInfix "\r" x) (lib.toList v)
  ) renderedValues;

  # Seconds, more than 0 and at most 10^9 as the daemon takes them: a whole
  # number, a float or a decimal string ("2.5", "1e-3").
  seconds =
    types.oneOf [
      (types.ints.between 1 1000000000)
      (types.addCheck types.float (x: x > 0 && x <= 1.0e9))
      (types.strMatching "([0-9]*[1-9][0-9]*(\\.[0-9]*)?|[0-9]*\\.[0-9]*[1-9][0-9]*)([eE][-+]?[0-9]+)?")
    ]
    // {
      description = "seconds, a number greater than 0 (such as 600 or 2.5)";
    };
  # A setting the user did not set writes no line: the daemon's own default
  # applies (`defaultText` shows it), also after a package update changes it.
  setting =
    type: daemonDefault: description:
    mkOption {
      type = types.nullOr type;
      default = null;
      defaultText = literalExpression daemonDefault;
      inherit description;
    };

  # Directories the service writes besides its state directory: created
  # before it starts (a missing one would fail the unit with 226/NAMESPACE),
  # and made writable in its read-only file system.
  extraWritableDirs =
    uploadDirs
    ++ optional (
      metricsDir != null && metricsDir != stateDir && !lib.hasPrefix "${stateDir}/" metricsDir
    ) metricsDir;

  # The daemon's exit status for a bad configuration (EX_CONFIG): a restart
  # would only fail the same way. Transient errors exit 1 and are restarted.
  exitBadConfig = 78;
in
{
  options.services.nix-post-build-hook-queue = {
    enable = mkEnableOption "nix-post-build-hook-queue, a post-build-hook that queues built paths for a daemon that signs and uploads them";

    package = mkPackageOption pkgsWithPackage name {
      extraDescription = ''
        Its `bin/post-build-hook` becomes `nix.settings.post-build-hook`, its
        `bin/post-build-hook-queue` runs as the daemon and is installed for
        the admin commands (`status`, `wait`, `retry`). Without an overlay
        that adds `pkgs.nix-post-build-hook-queue`, the package is built from
        the `default.nix` beside this module. The Nix the daemon runs is
        `config.nix.package`.
      '';
    };

    # The next three keep the original module's names and meaning (a string
    # or null still works for uploadTo).
    signingPrivateKeyPath = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/cache-signing-priv-key";
      description = ''
        Path to the secret key (from `nix-store --generate-binary-cache-key`)
        the daemon signs paths with before uploading them (with
        `sign-closure`, their whole closure). Paths are not signed if null.

        Give it as a string outside the Nix store (for example a sops-nix or
        agenix secret): the file is read by systemd when the service starts
        (`LoadCredential=`) and is never copied into the store. It may be
        readable by root only.

        The other way to sign is `nix.settings.secret-key-files`: nix-daemon
        signs each path as it builds it, with no privilege given to this
        service. It signs only what is built here, not what was substituted
        or built before, nor what `post-build-hook-queue enqueue` adds. Use
        `secret-key-files` when every uploaded path is built here; use this
        option when the cache must hold a signature on a whole closure or on
        enqueued paths, or when the key must stay away from nix-daemon. Set
        one of the two, not both (a warning says so).

        With a Nix older than 2.17 the service user must be in
        `nix.settings.trusted-users` to sign (an assertion says so).
      '';
    };

    sshPrivateKeyPath = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/cache-ssh-priv-key";
      description = ''
        Path to the private SSH key used to upload to an `ssh://` or
        `ssh-ng://` `uploadTo`. Like `signingPrivateKeyPath` it is a string
        outside the Nix store, read by systemd (`LoadCredential=`) and never
        copied into the store.

        The host key of the cache must be known: set
        `programs.ssh.knownHosts` for it (uploads run with `BatchMode=yes`,
        so an unknown host key fails instead of prompting).
      '';
    };

    uploadTo = mkOption {
      type = types.coercedTo (types.nullOr types.str) (v: if v == null then [ ] else [ v ]) (
        types.listOf types.nonEmptyStr
      );
      default = [ ];
      example = [
        "s3://nix-cache?region=eu-west-1"
        "ssh-ng://nix-ssh@nix-mirror.example.com"
      ];
      description = ''
        Store URLs the daemon uploads built paths to (`nix copy --to`), for
        example `ssh://nix-ssh@nix-cache.example.com`, `ssh-ng://...`,
        `s3://...` or `file:///var/cache/nix?compression=zstd`: one string
        or a list; what several modules set is merged into one list. Every
        path goes to each target, each with its own retries. Credentials for
        `s3://` go in `environmentFile`.

        For `file://` the directory is created (owned by `user`) if it does
        not exist.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/nix-post-build-hook-queue.env";
      description = ''
        A file of `NAME=value` lines (systemd's `EnvironmentFile=`) that the
        daemon and the `nix copy` and `upload-command` calls it starts get
        in their environment: the place for an uploader's token
        (`CACHIX_AUTH_TOKEN`, an attic token) or S3 credentials
        (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`). Never put a token in
        `upload-command`: the command is shown by `status`, in the log and
        in the store.

        Like the keys, a string outside the Nix store; systemd reads it as
        root when the service starts (a restart reads it again).
      '';
    };

    socketGroup = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "nix-ci";
      description = ''
        A group whose members may use the daemon's socket (then mode 0660):
        `enqueue` paths (for example what a CI job substituted or built
        before, which the post-build-hook never sees), `status` and `wait`
        (`NPBHQ_SOCKET` in their environment names the socket).
        Only root and the daemon's own user may `retry`, `requeue` and
        `drop`. Null: the socket is root's alone (mode 0600). The group is
        created if nothing else declares it.
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Check the config file when the system is built, with the package's
        `post-build-hook-queue check-config`, so that a bad setting fails
        `nixos-rebuild build` instead of the service at the switch. The
        check runs the package on the build machine (it is skipped when the
        build machine cannot run it) and sees the build sandbox: turn it off
        only if it refuses something that exists only on the running system
        (for example an `upload-command` outside the store).
      '';
    };

    user = mkOption {
      type = types.str;
      default = defaultUser;
      description = ''
        User the daemon runs as; give it ownership of the key files
        (for example `sops.secrets.<name>.owner = config.services.nix-post-build-hook-queue.user;`,
        though systemd reads them as root either way). The module adds it
        to `nix.settings.extra-allowed-users`.

        The module creates it as a system user (the original module's
        `nix-pb` too), with the state directory as its home, unless the
        configuration declares it a normal account (`isNormalUser`)
        elsewhere: such an account is left as it is (its home, its groups).
      '';
    };

    group = mkOption {
      type = types.str;
      default = defaultUser;
      description = ''
        Group the daemon runs as. This module creates it.
      '';
    };

    settings = mkOption {
      default = { };
      example = literalExpression ''
        {
          batch-size = 100;
          retry-max-delay = 600;
          metrics-file = "/var/lib/nix-post-build-hook-queue/metrics.prom";
          upload-command = [ (lib.getExe pkgs.cachix) "push" "mycache" ];
        }
      '';
      description = ''
        The daemon's configuration file (`--config`), one `key = value` line
        per attribute (nix.conf syntax). See `post-build-hook-queue --help`
        for every key. `signing-key-file`, `upload-to`, `state-dir`,
        `spool-dir`, `socket`, `socket-mode` and `socket-group` are set by
        the module and may not appear here. A setting left null writes no
        line: the daemon's default (shown below) applies. A key the daemon
        does not know fails evaluation; a value it refuses fails the build
        (see `checkConfig`).
      '';
      type = types.submodule {
        options =
          # Set by the module itself: declared so that setting one fails
          # with a message saying what to do instead (see the assertions).
          lib.mapAttrs (
            _: why:
            mkOption {
              type = types.nullOr (types.either types.str types.path);
              default = null;
              visible = false;
              description = why;
            }
          ) moduleOwnedKeys
          // {
            batch-size = setting types.ints.positive "1000" "Most store paths given to one `nix store sign` or `nix copy` call.";
            upload-jobs = setting types.ints.positive "2" ''
              Most `nix copy` calls one batch is split across, run at once (each
              with at least 32 paths). Compression keeps one core busy per call;
              the calls run 10 nice steps below the daemon, so builds come first.
            '';
            sign-closure = setting types.bool "true" "Sign the whole closure of each built path (`nix store sign --recursive`), not only the path itself.";
            substitute-on-destination = setting types.bool "false" ''
              For `ssh://` and `ssh-ng://` targets: pass `--substitute-on-destination`
              to `nix copy`, so that the receiver fetches what its own substituters
              have (for example the public NixOS cache) instead of receiving it over ssh.
            '';
            command-timeout = setting seconds "600" "Seconds one nix call may run before it is killed and retried.";
            retry-initial-delay = setting seconds "1" "Seconds before the first retry of a failed upload; doubled after each failure.";
            retry-max-delay = setting seconds "300" "Longest delay, in seconds, between two attempts.";
            max-attempts = setting types.ints.unsigned "10" ''
              Failed attempts, counted only while the target takes other paths
              or answers, after which a path is given up on: it stays in the
              journal, shows in `status`, and is no longer retried or waited
              for until `post-build-hook-queue requeue`. 0: never.
            '';
            give-up-after = setting (types.either (types.enum [ 0 ]) seconds) "86400" "Seconds after it was queued that a path still failing is given up on (see `max-attempts`). 0: never.";
            upload-command = mkOption {
              type = types.nullOr (types.nonEmptyListOf types.str);
              default = null;
              example = literalExpression ''[ (lib.getExe pkgs.cachix) "push" "mycache" ]'';
              description = ''
                An uploader (no shell): the program, by its absolute path (the
                service's PATH holds only nix and openssh; a bare name fails
                evaluation), and its arguments, the paths appended as further
                arguments. No word may hold white space. One more target beside
                those of `uploadTo`: every path goes to each. Its token goes in
                `environmentFile`, never here.
              '';
            };
            max-connections = setting types.ints.positive "256" "Most client connections served at once.";
            metrics-file = mkOption {
              type = types.nullOr types.path;
              default = null;
              example = "/var/lib/nix-post-build-hook-queue/metrics.prom";
              description = ''
                Prometheus text file the daemon rewrites every few seconds.
                Its directory is created (owned by `user`) if it does not exist
                and made writable in the service's sandbox.
              '';
            };
            store-dir = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "/nix/store";
              description = "The Nix store directory every queued path must be directly under (null: the daemon's default, `/nix/store` or `$NIX_STORE_DIR`).";
            };
            nix = mkOption {
              type = types.nullOr (types.either types.str types.path);
              default = null;
              description = "The `nix` program the daemon runs (null: `nix` from the service's PATH, which holds `config.nix.package`).";
            };
          };
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      (keyOutsideStore "signingPrivateKeyPath" signingKey "cache-signing-priv-key")
      (keyOutsideStore "sshPrivateKeyPath" sshKey "cache-ssh-priv-key")
      (keyOutsideStore "environmentFile" environmentFile "nix-post-build-hook-queue.env")
      {
        assertion = signingKey == null || nixLetsAnyUserSign || userIsTrusted;
        message = ''
          services.nix-post-build-hook-queue.signingPrivateKeyPath is set, but
          nix.package is Nix ${nixVersion}. The daemon runs as the unprivileged
          user "${cfg.user}" and signs through the Nix daemon, and Nix before 2.17
          lets only trusted users add signatures ("you are not privileged to add
          signatures"). Either
            - use Nix 2.17 or newer: nix.package = pkgs.nixVersions.latest; or
            - make the service user trusted:
                nix.settings.trusted-users = [ "${cfg.user}" ];
              (what the original module did; a trusted user is as good as root,
              so whoever takes over the daemon gets root).
          (user = "root" only works through root's own trusted-users entry and
          drops the user separation; it is not a third way.)
        '';
      }
      {
        assertion = !(builtins.elem (lib.getName cfg.package) [
          "nix"
          "lix"
        ]);
        message = ''
          services.nix-post-build-hook-queue.package is ${lib.getName cfg.package}. In this
          module `package` is the nix-post-build-hook-queue package (it provides
          the post-build-hook); in the original module it chose the Nix to run.
          Remove it, and set nix.package to choose the Nix instead.
        '';
      }
      {
        assertion = builtins.all (k: cfg.settings.${k} == null) (builtins.attrNames moduleOwnedKeys);
        message = lib.concatStringsSep "\n" (
          lib.mapAttrsToList (k: why: "services.nix-post-build-hook-queue.settings.${k}: ${why}.") (
            lib.filterAttrs (k: _: cfg.settings.${k} != null) moduleOwnedKeys
          )
        );
      }
      {
        assertion =
          uploadCommand == null
          || builtins.all (w: w != "" && builtins.match ".*[[:space:]].*" w == null) uploadCommand;
        message = "services.nix-post-build-hook-queue.settings.upload-command: a word is empty or holds white space; the daemon splits the command at spaces and runs no shell.";
      }
      {
        assertion = lib.hasPrefix "/" uploadProgram;
        message = ''
          services.nix-post-build-hook-queue.settings.upload-command: the program
          "${uploadProgram}" is not an absolute path. The service's PATH holds
          only nix and openssh, so a bare name is never found. Give the program
          by its path in the store, e.g.
            upload-command = [ (lib.getExe pkgs.cachix) "push" "mycache" ];
          and its token through services.nix-post-build-hook-queue.environmentFile.
        '';
      }
      {
        assertion = badValues == { };
        message = ''
          services.nix-post-build-hook-queue.settings: the value of
          ${lib.concatStringsSep ", " (builtins.attrNames badValues)} holds a `#` or a line break,
          which the config file cannot hold (everything after `#` on a line is
          a comment).
        '';
      }
    ];

    warnings =
      optional (sshKey != null && !uploadIsSsh) ''
        services.nix-post-build-hook-queue.sshPrivateKeyPath is set but uploadTo
        (${if uploads == [ ] then "not set" else lib.concatStringsSep ", " uploads}) has no ssh:// or ssh-ng:// URL; the key is unused.
      ''
      ++ optional (signingKey != null && nixDaemonSigns) ''
        services.nix-post-build-hook-queue: both signingPrivateKeyPath and
        nix.settings.secret-key-files are set, so built paths are signed twice.
        Keep secret-key-files if every uploaded path is built on this machine;
        keep signingPrivateKeyPath to sign whole closures and enqueued paths
        (see its description).
      ''
      ++ optional (signingKey == null && uploads == [ ] && uploadCommand == null) ''
        services.nix-post-build-hook-queue: neither signingPrivateKeyPath nor a
        target (uploadTo, settings.upload-command) is set, so the daemon only
        journals the built paths and does nothing with them.
      '';

    # Whatever the names (the original module's users set user = "nix-pb"),
    # unless the account is a normal one declared elsewhere (see `user`).
    # mkIf on each attribute: a condition on the whole account would read
    # the account while defining it.
    users.users = mkIf (cfg.user != "root") {
      ${cfg.user} = lib.mapAttrs (_: mkIf (!userIsNormal)) {
        isSystemUser = true;
        inherit (cfg) group;
        description = "nix-post-build-hook-queue daemon";
        # ssh looks for ~/.ssh (known_hosts) in the passwd home, not $HOME.
        home = stateDir;
      };
    };
    users.groups = lib.mkMerge [
      (mkIf (cfg.group != "root") { ${cfg.group} = { }; })
      (mkIf (cfg.socketGroup != null) { ${cfg.socketGroup} = { }; })
    ];

    nix.settings = {
      post-build-hook = "${cfg.package}/bin/post-build-hook";
      # The daemon signs and copies through nix-daemon as this user.
      extra-allowed-users = mkIf (cfg.user != "root") [ cfg.user ];
    };

    # For the admin commands: sudo post-build-hook-queue status / wait / retry.
    environment.systemPackages = [ cfg.package ];
    # The socket for the group's members, whose own default would be their
    # per-user runtime directory.
    environment.variables = mkIf (cfg.socketGroup != null) { NPBHQ_SOCKET = socketPath; };

    # A file:// cache or metrics directory that does not exist yet: created
    # at activation (and at boot), owned by the service's user.
    systemd.tmpfiles.rules = map (dir: "d ${dir} 0755 ${cfg.user} ${cfg.group} - -") extraWritableDirs;

    systemd.sockets.${name} = {
      description = "nix-post-build-hook-queue socket (the post-build-hook's way in)";
      wantedBy = [ "sockets.target" ];
      listenStreams = [ socketPath ];
      # Owned by root, 0600: the Nix daemon runs the post-build-hook as root.
      # With socketGroup, 0660: its members may enqueue, status and wait (the
      # daemon refuses them retry, requeue and drop).
      socketConfig =
        if cfg.socketGroup == null then
          { SocketMode = "0600"; }
        else
          {
            SocketMode = "0660";
            SocketGroup = cfg.socketGroup;
          };
    };

    systemd.services.${name} = {
      description = "nix-post-build-hook-queue: sign and upload built store paths";
      # Socket activation starts it on the first hook; starting it at boot as
      # well retries what the journal still holds from before a reboot.
      wantedBy = [ "multi-user.target" ];
      # It reaches the store only through the Nix daemon.
      wants = [ "nix-daemon.socket" ];
      after = [ "nix-daemon.socket" ] ++ optional needsInet "network.target";

      # A switch restarts the service and keeps the socket listening: hooks
      # that run meanwhile wait in the socket's backlog instead of spooling.
      # (With the default, true, a switch stops the socket too and starts
      # only the socket again.)
      stopIfChanged = false;

      path = [
        config.nix.package
        pkgs.openssh
      ];

      environment = {
        # nix writes ~/.cache/nix (and ssh ~/.ssh): keep both in the state dir.
        HOME = stateDir;
        XDG_CACHE_HOME = "${stateDir}/.cache";
        # The store is read-only in this sandbox: always go through the daemon
        # rather than rely on nix's auto-detection.
        NIX_REMOTE = "daemon";
        # systemd expands %d (the credentials directory) in Environment= too.
        # BatchMode: never prompt (password, passphrase, unknown host key).
        # ConnectTimeout: a host that accepts and never answers would
        # otherwise hang the upload for good.
        NIX_SSHOPTS = lib.concatStringsSep " " (
          [
            "-o BatchMode=yes"
            "-o ConnectTimeout=${toString sshConnectTimeout}"
            "-o IPQoS=throughput"
          ]
          ++ optionals (sshKey != null) [
            "-o IdentitiesOnly=yes"
            "-i %d/ssh-key"
          ]
        );
      };

      serviceConfig = {
        Type = "notify"; # the daemon sends READY=1 once it is listening
        ExecStart = lib.concatStringsSep " " (
          [
            daemonProgram
            "serve"
            "--config"
            "${configFile}"
            # As a flag, not in the file: the daemon runs as a non-root user,
            # whose built-in default would be ~/.local/state.
            "--state-dir"
            stateDir
          ]
          # %d is expanded by systemd; the config file could not do that.
          ++ optionals (signingKey != null) [
            "--signing-key-file"
            "%d/signing-key"
          ]
        );
        Restart = "on-failure";
        RestartSec = 5;
        # A bad configuration: restarting cannot help.
        RestartPreventExitStatus = exitBadConfig;
        # Uploaders' tokens, S3 credentials (read by systemd, as root).
        EnvironmentFile = optional (environmentFile != null) environmentFile;
        # On stop, SIGTERM goes to the daemon alone: it lets the nix call in
        # progress finish (or kills it after its grace period) and exits;
        # only what is left after TimeoutStopSec is killed.
        KillMode = "mixed";
        TimeoutStopSec = stopTimeout;

        User = cfg.user;
        Group = cfg.group;
        StateDirectory = name;
        StateDirectoryMode = "0700";
        UMask = "0077";

        # systemd (as root) copies the keys to /run/credentials/<unit>/, a
        # non-swappable directory only this service's user can read; the
        # files never enter the store. toString: see keyPath.
        LoadCredential =
          optional (signingKey != null) "signing-key:${signingKey}"
          ++ optional (sshKey != null) "ssh-key:${sshKey}";

        # Hardening. The Nix daemon socket (/nix/var/nix/daemon-socket/socket)
        # needs no exception: connecting to a unix socket works on a read-only
        # mount, and AF_UNIX is allowed below.
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        # Writable besides the state directory: only what the configuration
        # names (a file:// cache, the metrics file's directory).
        # `-`: a directory that is not there (yet) does not fail the unit; the
        # tmpfiles rules above create it.
        ReadWritePaths = map (dir: "-${dir}") extraWritableDirs;
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        PrivateMounts = true;
        PrivateUsers = true;
        # No network namespace access at all unless uploading off the machine
        # (unix sockets by path, socket activation and sd_notify still work).
        PrivateNetwork = !needsInet;
        ProtectClock = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectProc = "invisible";
        # Relaxed from "pid": nix's garbage collector (Boehm GC) reads
        # /proc/stat and warns "GC Warning: Couldn't read /proc/stat" otherwise.
        ProcSubset = "all";
        RestrictAddressFamilies = [ "AF_UNIX" ] ++ optionals needsInet [
          "AF_INET"
          "AF_INET6"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        # One item a line, as NixOS writes lists: systemd applies them in
        # order, so `setpriority` (in @resources) is allowed again after
        # `~@resources`. The daemon lowers its upload worker's priority with
        # it (nice); without it the first upload killed the daemon (SIGSYS).
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
          "~@resources"
          "setpriority"
        ];
        # A call outside the filter fails (EPERM) instead of killing the
        # process: a nix or ssh version that makes a new call still works.
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
