# Evaluates module.nix with nixpkgs' lib beside a small stand-in for the
# NixOS options it touches, and renders what NixOS would install: the unit
# files (as nixos/lib/systemd-lib.nix writes them: one line per list item,
# sections in attribute order), the config file, users, tmpfiles rules and
# nix.conf lines. tests/system/render.sh writes the result to
# tests/system/rendered/; tests/system.rs boots it under a real systemd.
#
# Not a copy of NixOS: only what this module uses, written for this test.
# Where the stand-in differs from NixOS it says so below.
{
  lib,
  module ? ../../module.nix,
}:

let
  inherit (lib) mkOption types;

  fakePackage = pname: version: outPath: {
    type = "derivation";
    name = "${pname}-${version}";
    inherit pname version outPath;
    drvPath = outPath;
    meta = { };
  };

  # Every program the units run comes from the container's /usr, except our
  # two binaries, which tests/system.rs bind-mounts at /opt/npbhq/bin.
  basePkgs = {
    callPackage = _fn: _args: fakePackage "nix-post-build-hook-queue" "0.1.0" "/opt/npbhq";
    # A real store file, so that its path is what NixOS would write and its
    # text can be read back (render.sh evaluates in read-write mode).
    writeText = builtins.toFile;
    # Stand-in difference: the build is not run (the package here is not
    # real): the checked file is its input, carrying its build script in
    # its string context (a store file named `check-script`), for
    # checks.txt (tests/packaging.rs runs the script).
    runCommand = _name: env: script: {
      outPath = builtins.appendContext env.unchecked {
        ${builtins.unsafeDiscardStringContext (builtins.toFile "check-script" script)} = {
          path = true;
        };
      };
    };
    stdenv = {
      buildPlatform.canExecute = _: true;
      hostPlatform = { };
    };
    openssh = fakePackage "openssh" "10.0" "/usr";
    coreutils = fakePackage "coreutils" "9.7" "/usr";
    findutils = fakePackage "findutils" "4.10" "/usr";
    gnugrep = fakePackage "gnugrep" "3.11" "/usr";
    gnused = fakePackage "gnused" "4.9" "/usr";
    systemd = fakePackage "systemd" "257" "/usr";
  };

  unitOption = types.attrsOf types.unspecified;
  strList = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };
  commonUnit = {
    description = mkOption {
      type = types.str;
      default = "";
    };
    wantedBy = strList;
    wants = strList;
    after = strList;
    before = strList;
    requires = strList;
    unitConfig = mkOption {
      type = unitOption;
      default = { };
    };
  };

  # The NixOS options module.nix sets or reads, typed like NixOS's.
  standIn =
    { config, ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        users.users = mkOption {
          type = types.attrsOf (
            types.submodule {
              options = {
                isSystemUser = mkOption {
                  type = types.bool;
                  default = false;
                };
                isNormalUser = mkOption {
                  type = types.bool;
                  default = false;
                };
                group = mkOption {
                  type = types.str;
                  default = "";
                };
                home = mkOption {
                  type = types.str;
                  default = "/var/empty";
                };
                description = mkOption {
                  type = types.str;
                  default = "";
                };
              };
            }
          );
          default = { };
        };
        users.groups = mkOption {
          type = types.attrsOf (types.attrsOf types.unspecified);
          default = { };
        };
        nix.package = mkOption {
          type = types.package;
          default = fakePackage "nix" "2.26.3" "/usr";
        };
        nix.settings = mkOption {
          type = types.attrsOf types.unspecified;
          default = { };
        };
        environment.variables = mkOption {
          type = types.attrsOf types.str;
          default = { };
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        systemd.tmpfiles.rules = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        systemd.services = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              options = commonUnit // {
                path = mkOption {
                  type = types.listOf types.package;
                  default = [ ];
                };
                environment = mkOption {
                  type = types.attrsOf (types.nullOr types.str);
                  default = { };
                };
                serviceConfig = mkOption {
                  type = unitOption;
                  default = { };
                };
                restartIfChanged = mkOption {
                  type = types.bool;
                  default = true;
                };
                stopIfChanged = mkOption {
                  type = types.bool;
                  default = true;
                };
              };
            }
          );
        };
        systemd.sockets = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              options = commonUnit // {
                listenStreams = strList;
                socketConfig = mkOption {
                  type = unitOption;
                  default = { };
                };
              };
            }
          );
        };
      };
    };

  eval =
    {
      settings,
      pkgs ? basePkgs,
      nixVersion ? "2.26.3",
      extra ? { },
    }:
    let
      evaluated = lib.evalModules {
        specialArgs = { inherit pkgs; };
        modules = [
          standIn
          module
          {
            nix.package = fakePackage "nix" nixVersion "/usr";
            services.nix-post-build-hook-queue = settings // {
              enable = true;
            };
          }
          extra
        ];
      };
      inherit (evaluated) config;
      # NixOS's own check of every account (users-groups.nix).
      accounts = lib.mapAttrsToList (n: u: {
        assertion = u.isSystemUser != u.isNormalUser;
        message = "Exactly one of users.users.${n}.isSystemUser and users.users.${n}.isNormalUser must be set.";
      }) config.users.users;
      failed = map (a: a.message) (builtins.filter (a: !a.assertion) (config.assertions ++ accounts));
    in
    # As NixOS does: a failed assertion stops the evaluation.
    if failed != [ ] then
      throw "failed assertions:\n${lib.concatStringsSep "\n" failed}"
    else
      config;

  # The unit text, as nixos/lib/systemd-lib.nix lays it out.
  value =
    v:
    if v == true then
      "true"
    else if v == false then
      "false"
    else
      toString v;
  section =
    attrs:
    lib.concatStrings (
      lib.mapAttrsToList (
        k: v: lib.concatMapStrings (x: "${k}=${value x}\n") (if builtins.isList v then v else [ v ])
      ) attrs
    );
  unitSection =
    def:
    lib.filterAttrs (_: v: v != "") {
      After = toString def.after;
      Before = toString def.before;
      Requires = toString def.requires;
      Wants = toString def.wants;
      Description = def.description;
    }
    // def.unitConfig;
  common =
    def: body:
    "[Unit]\n${section (unitSection def)}\n"
    + body
    + lib.optionalString (def.wantedBy != [ ]) "\n[Install]\nWantedBy=${toString def.wantedBy}\n";
  # NixOS adds coreutils, findutils, gnugrep, gnused and systemd to every
  # system service's path. Stand-in difference: all are /usr here, so the
  # list is made unique (NixOS's entries are distinct store paths).
  servicePath =
    def:
    lib.unique (
      map toString (
        def.path
        ++ [
          basePkgs.coreutils
          basePkgs.findutils
          basePkgs.gnugrep
          basePkgs.gnused
          basePkgs.systemd
        ]
      )
    );
  serviceText =
    def:
    let
      path = servicePath def;
      env =
        def.environment
        // {
          PATH = "${lib.makeBinPath path}:${lib.makeSearchPath "sbin" path}";
        };
    in
    common def (
      "[Service]\n"
      + lib.concatMapStrings (n: "Environment=${builtins.toJSON "${n}=${env.${n}}"}\n") (
        builtins.attrNames (lib.filterAttrs (_: v: v != null) env)
      )
      + lib.optionalString (!def.restartIfChanged) "X-RestartIfChanged=false\n"
      + lib.optionalString (!def.stopIfChanged) "X-StopIfChanged=false\n"
      + section def.serviceConfig
    );
  socketText =
    def:
    common def (
      "[Socket]\n${section def.socketConfig}\n"
      + lib.concatMapStringsSep "\n" (s: "ListenStream=${s}") def.listenStreams
      + "\n\n"
    );

  # Store files the service's command line names (the config file).
  storeFiles =
    text:
    let
      words = lib.splitString " " text;
      inStore = builtins.filter (w: lib.hasPrefix "${builtins.storeDir}/" w) words;
    in
    map (p: {
      path = p;
      text = builtins.readFile p;
    }) inStore;

  # One configuration as the multi-part text tests/system.rs reads: parts
  # start with a line `=== KIND NAME`.
  render =
    settings:
    let
      config = eval { inherit settings; };
      units =
        lib.mapAttrsToList (n: d: {
          name = "${n}.service";
          text = serviceText d;
        }) config.systemd.services
        ++ lib.mapAttrsToList (n: d: {
          name = "${n}.socket";
          text = socketText d;
        }) config.systemd.sockets;
      files = lib.concatMap (d: storeFiles d.serviceConfig.ExecStart) (
        builtins.attrValues config.systemd.services
      );
      users = lib.mapAttrsToList (
        n: u: "${n} group=${u.group} home=${u.home} system=${lib.boolToString (u.isSystemUser or false)}\n"
      ) config.users.users;
      part = kind: n: text: "=== ${kind} ${n}\n${text}";
    in
    lib.concatMapStrings (u: part "unit" u.name u.text) units
    + lib.concatMapStrings (f: part "file" f.path f.text) files
    + part "users" "-" (lib.concatStrings users)
    + part "groups" "-" (lib.concatMapStrings (g: "${g}\n") (builtins.attrNames config.users.groups))
    + part "tmpfiles" "-" (lib.concatMapStrings (r: "${r}\n") config.systemd.tmpfiles.rules)
    + part "nix.conf" "-" (
      lib.concatStrings (
        lib.mapAttrsToList (k: v: "${k} = ${lib.concatStringsSep " " (lib.toList v)}\n") config.nix.settings
      )
    )
    + part "variables" "-" (
      lib.concatStrings (lib.mapAttrsToList (k: v: "${k}=${v}\n") config.environment.variables)
    )
    + part "packages" "-" (
      lib.concatMapStrings (p: "${toString p}\n") config.environment.systemPackages
    )
    + part "warnings" "-" (lib.concatMapStrings (w: "${w}\n") config.warnings);

  # The configurations tests/system.rs boots. All sign (through the
  # nix-daemon, as the unprivileged user the original module's users name);
  # `file` and `ssh` use decimal seconds; `file` writes a metrics file;
  # neither the cache nor the metrics directory exists before the service
  # starts. `token`: an uploader that needs a token from the environment
  # file. `group`: a socket group. `substitute`: an ssh-ng receiver that
  # substitutes from its own cache, with only the built path signed.
  common' = {
    user = "nix-pb";
    group = "nix-pb";
    signingPrivateKeyPath = "/etc/npbhq-test/signing-key";
  };
  fileCache = "file:///var/cache/npbhq-test?compression=none";
  fast = {
    retry-initial-delay = 0.5;
    retry-max-delay = 2.5;
  };
  variants = {
    file = common' // {
      uploadTo = fileCache;
      settings = fast // {
        metrics-file = "/var/lib/npbhq-test-metrics/metrics.prom";
        batch-size = 50;
      };
    };
    ssh = common' // {
      uploadTo = "ssh-ng://root@127.0.0.1?remote-store=/srv/receiver";
      sshPrivateKeyPath = "/etc/npbhq-test/ssh-key";
      settings = fast // {
        command-timeout = 120;
      };
    };
    token = common' // {
      environmentFile = "/etc/npbhq-test/uploader.env";
      settings = fast // {
        upload-command = [
          "/usr/local/bin/npbhq-token-upload"
          "--to"
          "/var/lib/nix-post-build-hook-queue/uploaded"
        ];
      };
    };
    group = common' // {
      uploadTo = fileCache;
      socketGroup = "npbhq-ci";
      settings = fast;
    };
    substitute = common' // {
      uploadTo = "ssh-ng://root@127.0.0.1?remote-store=/srv/receiver";
      sshPrivateKeyPath = "/etc/npbhq-test/ssh-key";
      settings = fast // {
        sign-closure = false;
        substitute-on-destination = true;
      };
    };
  };

  # Facts about the module that need an evaluation, recorded so that a test
  # can check them where nixpkgs' lib is absent: `name = value` lines.
  fails = e: !(builtins.tryEval (builtins.deepSeq e e)).success;
  overlaid = basePkgs // {
    nix-post-build-hook-queue = fakePackage "nix-post-build-hook-queue" "0.1.0" "/opt/overlaid";
  };
  service = config: config.systemd.services.nix-post-build-hook-queue;
  # The config file the service's command line names (its text).
  configText =
    settings:
    lib.concatMapStrings (f: f.text) (
      storeFiles (service (eval { inherit settings; })).serviceConfig.ExecStart
    );
  # The script of the derivation that checks the config file, from the
  # service's command line (null: the file is not checked).
  configScript =
    args:
    let
      scripts = builtins.filter (lib.hasSuffix "-check-script") (
        builtins.attrNames (builtins.getContext (service (eval args)).serviceConfig.ExecStart)
      );
    in
    if scripts == [ ] then null else builtins.readFile (builtins.head scripts);
  # Whether the settings evaluate: the assertions hold, the types check.
  evaluates = settings: !fails (eval { inherit settings; });
  defaults = eval { settings = { }; };
  warns =
    infix: args: builtins.any (lib.hasInfix infix) (eval ({ settings = { }; } // args)).warnings;
  withAlice = eval {
    settings.user = "alice";
    extra.users.users.alice = {
      isNormalUser = true;
      group = "users";
      home = "/home/alice";
    };
  };
  checks = {
    default-user-created = defaults.users.users.nix-post-build-hook-queue.isSystemUser;
    nix-pb-user-created = (eval { settings.user = "nix-pb"; }).users.users.nix-pb.isSystemUser;
    # A normal account named as `user` is left as it is (NixOS refuses an
    # account that is both a normal and a system user).
    normal-user-left-alone =
      !fails withAlice
      && !withAlice.users.users.alice.isSystemUser
      && withAlice.users.users.alice.home == "/home/alice";
    known-settings-key-accepted = evaluates { settings.batch-size = 5; };
    unknown-settings-key-fails = !evaluates { settings.batch-sise = 5; };
    module-owned-key-fails = !evaluates { settings.socket = "/tmp/x.sock"; };
    old-nix-signing-untrusted-fails = fails (eval {
      settings.signingPrivateKeyPath = "/run/keys/k";
      nixVersion = "2.8.0";
    });
    key-in-store-fails = !evaluates {
      signingPrivateKeyPath = "${builtins.storeDir}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-k";
    };
    environment-file-in-store-fails = !evaluates {
      environmentFile = "${builtins.storeDir}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-env";
    };
    # Types that refuse what the daemon refuses.
    empty-upload-to-fails = !evaluates { uploadTo = ""; };
    empty-upload-to-in-list-fails = !evaluates { uploadTo = [ "" ]; };
    null-upload-to-accepted = evaluates { uploadTo = null; };
    negative-timeout-fails = !evaluates { settings.command-timeout = -1.0; };
    zero-delay-fails = !evaluates { settings.retry-initial-delay = 0; };
    zero-delay-string-fails = !evaluates { settings.retry-max-delay = "0.0"; };
    give-up-never-accepted = evaluates { settings.give-up-after = 0; };
    empty-upload-command-fails = !evaluates { settings.upload-command = [ ]; };
    bare-upload-command-fails = !evaluates {
      settings.upload-command = [
        "cachix"
        "push"
        "mycache"
      ];
    };
    absolute-upload-command-accepted = evaluates {
      settings.upload-command = [
        "${builtins.storeDir}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-cachix/bin/cachix"
        "push"
        "mycache"
      ];
    };
    # nix-daemon lets the service user in whatever allowed-users says.
    extra-allowed-users = toString defaults.nix.settings.extra-allowed-users;
    warns-when-it-only-journals = warns "does nothing with them" { };
    quiet-with-a-target = !(warns "does nothing with them" { settings.uploadTo = "file:///var/cache/a"; });
    warns-when-signed-twice = warns "signed twice" {
      settings = {
        signingPrivateKeyPath = "/run/keys/k";
        uploadTo = "file:///var/cache/a";
      };
      extra.nix.settings.secret-key-files = [ "/run/keys/k" ];
    };
    overlaid-package-runs = lib.hasPrefix "/opt/overlaid/" (service (eval {
      settings = { };
      pkgs = overlaid;
    })).serviceConfig.ExecStart;
    overlaid-package-installed =
      map toString
        (eval {
          settings = { };
          pkgs = overlaid;
        }).environment.systemPackages == [ "/opt/overlaid" ];
    default-package-installed = map toString defaults.environment.systemPackages == [ "/opt/npbhq" ];
    # Every key `settings` takes (declared options: no free-form keys).
    settings-keys = lib.concatStringsSep " " (
      builtins.attrNames defaults.services.nix-post-build-hook-queue.settings
    );
    # Settings nobody set write no line: only the header.
    nothing-set-rendered = configText { };
    # uploadTo as a list: one `upload-to` line per target (the daemon reads
    # a repeated key as several targets); a plain string still works, and
    # a string and a list from two modules merge.
    several-targets-rendered = configText {
      uploadTo = [
        "file:///var/cache/a?compression=none"
        "ssh-ng://nix-ssh@mirror.example.com"
      ];
    };
    one-target-rendered = configText { uploadTo = "file:///var/cache/a"; };
    merged-targets-rendered = lib.concatMapStrings (f: f.text) (
      storeFiles
        (service (eval {
          settings.uploadTo = "file:///var/cache/a";
          extra.services.nix-post-build-hook-queue.uploadTo = [ "ssh-ng://nix-ssh@mirror.example.com" ];
        })).serviceConfig.ExecStart
    );
    decimal-seconds-rendered = configText {
      settings = {
        command-timeout = 2.5;
        retry-initial-delay = 1.0e-7;
        retry-max-delay = "7.5";
      };
    };
    # The build script that checks the config file (tests/packaging.rs
    # runs it with the real daemon); its absence when checkConfig is off
    # or when the build machine cannot run the package.
    config-check-script = configScript { settings = { }; };
    config-check-off = configScript { settings.checkConfig = false; } == null;
    config-check-cross = configScript {
      settings = { };
      pkgs = basePkgs // {
        stdenv = basePkgs.stdenv // {
          buildPlatform.canExecute = _: false;
        };
      };
    } == null;
  };
  checksText = lib.concatStrings (
    lib.mapAttrsToList (
      k: v: "${k} = ${if builtins.isBool v then lib.boolToString v else builtins.toJSON v}\n"
    ) checks
  );
in
lib.mapAttrs (_: render) variants // { checks = checksText; }
