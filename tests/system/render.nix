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
          type = types.attrsOf (types.attrsOf types.unspecified);
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
        ];
      };
      inherit (evaluated) config;
      failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
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
    + part "nix.conf" "-" (lib.concatStrings (lib.mapAttrsToList (k: v: "${k} = ${v}\n") config.nix.settings))
    + part "packages" "-" (
      lib.concatMapStrings (p: "${toString p}\n") config.environment.systemPackages
    )
    + part "warnings" "-" (lib.concatMapStrings (w: "${w}\n") config.warnings);

  # The two configurations tests/system.rs runs. Both sign (through the
  # nix-daemon, as the unprivileged user the original module's users name)
  # and use decimal seconds; `file` writes a metrics file; neither the cache
  # nor the metrics directory exists before the service starts.
  common' = {
    user = "nix-pb";
    group = "nix-pb";
    signingPrivateKeyPath = "/etc/npbhq-test/signing-key";
  };
  variants = {
    file = common' // {
      uploadTo = "file:///var/cache/npbhq-test?compression=none";
      settings = {
        metrics-file = "/var/lib/npbhq-test-metrics/metrics.prom";
        retry-initial-delay = 0.5;
        retry-max-delay = 2.5;
        batch-size = 50;
      };
    };
    ssh = common' // {
      uploadTo = "ssh-ng://root@127.0.0.1?remote-store=/srv/receiver";
      sshPrivateKeyPath = "/etc/npbhq-test/ssh-key";
      settings = {
        retry-initial-delay = 0.5;
        retry-max-delay = 2.5;
        command-timeout = 120;
      };
    };
  };

  # Facts about the module that need an evaluation, recorded so that a test
  # can check them where nixpkgs' lib is absent: `name = value` lines.
  fails = e: !(builtins.tryEval (builtins.deepSeq e e)).success;
  overlaid = basePkgs // {
    nix-post-build-hook-queue = fakePackage "nix-post-build-hook-queue" "0.1.0" "/opt/overlaid";
  };
  configText =
    settings:
    lib.concatMapStrings (f: f.text) (
      storeFiles (eval { inherit settings; }).systemd.services.nix-post-build-hook-queue.serviceConfig.ExecStart
    );
  defaults = eval { settings = { }; };
  checks = {
    default-user-created = defaults.users.users ? nix-post-build-hook-queue;
    nix-pb-user-created = (eval { settings = { user = "nix-pb"; }; }).users.users ? nix-pb;
    known-settings-key-accepted = !fails (eval {
      settings.settings.batch-size = 5;
    });
    unknown-settings-key-fails = fails (eval {
      settings.settings.batch-sise = 5;
    });
    module-owned-key-fails = fails (eval {
      settings.settings.socket = "/tmp/x.sock";
    });
    old-nix-signing-untrusted-fails = fails (eval {
      settings.signingPrivateKeyPath = "/run/keys/k";
      nixVersion = "2.8.0";
    });
    key-in-store-fails = fails (eval {
      settings.signingPrivateKeyPath = "${builtins.storeDir}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-k";
    });
    overlaid-package-runs =
      lib.hasPrefix "/opt/overlaid/" (eval {
        settings = { };
        pkgs = overlaid;
      }).systemd.services.nix-post-build-hook-queue.serviceConfig.ExecStart;
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
    # uploadTo as a list: one `upload-to` line per target (the daemon reads
    # a repeated key as several targets); a plain string still works.
    several-targets-rendered = configText {
      uploadTo = [
        "file:///var/cache/a?compression=none"
        "ssh-ng://nix-ssh@mirror.example.com"
      ];
    };
    one-target-rendered = configText { uploadTo = "file:///var/cache/a"; };
    decimal-seconds-rendered = configText {
      settings = {
        command-timeout = 2.5;
        retry-initial-delay = 1.0e-7;
        retry-max-delay = "7.5";
      };
    };
  };
  checksText = lib.concatStrings (
    lib.mapAttrsToList (
      k: v: "${k} = ${if builtins.isBool v then lib.boolToString v else builtins.toJSON v}\n"
    ) checks
  );
in
lib.mapAttrs (_: render) variants // { checks = checksText; }
