//! The system tier: the daemon under the units module.nix renders, in a
//! Debian 13 container with systemd as PID 1 and the multi-user Nix 2.26
//! (nix-daemon, build users), as on NixOS. The hook runs inside nix-daemon
//! as root; the daemon runs as the module's unprivileged user and signs
//! through nix-daemon.
//!
//! The units come from tests/system/rendered/ (tests/system/render.sh writes
//! them from module.nix with nixpkgs' lib; `rendered_units_match_module_nix`
//! fails when they are stale). The root file system comes from
//! tests/system/mkroot.sh, which builds it when it is missing. Each test
//! boots its own container (`systemd-nspawn --volatile=overlay`, a machine
//! name and cgroup of its own) and cleans up after itself. Nothing here
//! skips: no root, no systemd-nspawn or no debootstrap is a failure.
//!
//! Set `NPBHQ_RENDERED_DIR` to boot other rendered units (for example the
//! ones of an older module.nix) with the same scenarios.

mod common;

use common::{
    daemon_bin, hook_bin, line_after, on_path, poll, rendered_check, run_ok, run_to_exit,
    unique_id, wait_until_ok, write_script, Rendered, TempDir,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const UNIT: &str = "nix-post-build-hook-queue";
const CACHE_URL: &str = "file:///var/cache/npbhq-test?compression=none";
const CACHE_DIR: &str = "/var/cache/npbhq-test";
const STATE_DIR: &str = "/var/lib/nix-post-build-hook-queue";
const METRICS_FILE: &str = "/var/lib/npbhq-test-metrics/metrics.prom";
const RECEIVER: &str = "/srv/receiver";
const PUBLIC_KEY: &str = "/etc/npbhq-test/signing-key.pub";
/// How every container boots: systemd as PID 1, in a network namespace of
/// its own, its root file system never changed (writes go to a tmpfs).
const NSPAWN_OPTIONS: &str =
    "--boot --register=no --keep-unit --private-network --volatile=overlay --console=read-only";
/// Longest any one command inside the container may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);
/// Longest a delivery may take (generous: a bound, not a speed figure).
const DELIVERY_DEADLINE: Duration = Duration::from_secs(120);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rendered_dir() -> PathBuf {
    std::env::var_os("NPBHQ_RENDERED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("tests/system/rendered"))
}

/// What a finished command left.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.status.success()
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let (status, out, err) = (self.status, &self.stdout, &self.stderr);
        write!(f, "{status}\nstdout:\n{out}\nstderr:\n{err}")
    }
}

/// Runs `cmd`, killing it (and failing the test) if it outlasts `deadline`.
fn run_deadline(cmd: &mut Command, deadline: Duration) -> Ran {
    let out = run_to_exit(cmd, deadline);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ran {
        status: out.status,
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
    }
}

/// A booted container: systemd-nspawn in a cgroup of its own, its PID 1, and
/// a scratch directory on the host. Dropping it powers it off and removes
/// the cgroups and nspawn's propagation directory.
struct Container {
    machine: String,
    nspawn: Child,
    pid1: u32,
    cgroups: Vec<PathBuf>,
    scratch: PathBuf,
}

/// The root file system, built by tests/system/mkroot.sh when missing.
fn rootfs() -> PathBuf {
    let script = repo().join("tests/system/mkroot.sh");
    let ran = run_deadline(&mut Command::new(&script), Duration::from_secs(900));
    assert!(
        ran.ok(),
        "tests/system/mkroot.sh failed (it needs root and debootstrap): {ran}"
    );
    PathBuf::from(ran.stdout.trim())
}

/// Says in one line why the system tier cannot run here, before a container
/// is booted: systemd-nspawn needs CAP_SYS_ADMIN (mounts, namespaces) and
/// CAP_NET_ADMIN (without it the container's loopback stays down, and sshd
/// there would never listen).
fn preflight() {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let capeff = line_after(&status, "CapEff:").map(|v| u64::from_str_radix(v.trim(), 16));
    let capeff = capeff.and_then(Result::ok).unwrap_or(0);
    for (bit, name, why) in [
        (21, "CAP_SYS_ADMIN", "for its mounts and namespaces"),
        (12, "CAP_NET_ADMIN", "for the loopback the tests' sshd uses"),
    ] {
        assert!(
            (capeff >> bit) & 1 == 1,
            "the system tier cannot run here: no {name} (systemd-nspawn needs it {why}); run as root on a machine, or in a container with {name}"
        );
    }
    for tool in ["systemd-nspawn", "nsenter"] {
        assert!(
            on_path(tool).is_some(),
            "{tool} is not installed: the system tier needs it (apt-get install systemd-container util-linux)"
        );
    }
}

/// The pid (in the host's namespace) of the child of `parent` that is PID 1
/// of its own pid namespace, once it runs systemd.
fn container_pid1(parent: u32) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            let value = status.lines().find_map(|l| l.strip_prefix(name));
            value.map_or(Vec::new(), |v| v.split_whitespace().collect::<Vec<_>>())
        };
        let nspid = field("NSpid:");
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let is_pid1 = field("PPid:") == [parent.to_string().as_str()]
            && nspid.len() >= 2
            && nspid.last() == Some(&"1")
            && comm.trim() == "systemd";
        is_pid1.then_some(pid)
    })
}

impl Container {
    /// Boots the root file system with our two binaries at /opt/npbhq/bin
    /// (read-only) and waits until systemd reports the system running.
    fn boot(tag: &str) -> Container {
        preflight();
        let id = unique_id();
        let scratch = std::env::temp_dir().join(format!("npbhq-system-{tag}-{id}"));
        fs::create_dir_all(&scratch).expect("scratch dir");
        let root = rootfs();
        // Short and unique: it names the cgroups and nspawn's directories.
        let machine = format!("npbhq-{tag}-{}", id.replace('-', ""));
        let machine: String = machine.chars().take(60).collect();
        let mut cgroups = Vec::new();
        for hierarchy in ["unified", "systemd"] {
            let base = Path::new("/sys/fs/cgroup").join(hierarchy);
            if base.is_dir() {
                let dir = base.join(&machine);
                fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
                cgroups.push(dir);
            }
        }
        let enter: String = cgroups
            .iter()
            .map(|d| format!("echo $$ > {}/cgroup.procs && ", d.display()))
            .collect();
        let bind =
            |bin: PathBuf, name: &str| format!("--bind-ro={}:/opt/npbhq/bin/{name}", bin.display());
        let log = fs::File::create(scratch.join("nspawn.log")).expect("log");
        let nspawn = Command::new("sh")
            .arg("-c")
            .arg(format!("{enter}exec \"$@\""))
            .args(["sh", "systemd-nspawn", "--quiet", "-D"])
            .arg(&root)
            .args(["--machine", &machine])
            .args(NSPAWN_OPTIONS.split(' '))
            .arg(bind(daemon_bin(), "post-build-hook-queue"))
            .arg(bind(hook_bin(), "post-build-hook"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cannot start systemd-nspawn");
        let mut c = Container {
            machine,
            pid1: 0,
            nspawn,
            cgroups,
            scratch,
        };
        let start = Instant::now();
        let pid1 = poll(Duration::from_secs(60), 20, || {
            if let Ok(Some(status)) = c.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited ({status}) before the container started:\n{}",
                    c.nspawn_log()
                );
            }
            container_pid1(c.nspawn.id())
        });
        c.pid1 = pid1.unwrap_or_else(|| {
            panic!(
                "the container's PID 1 did not appear within 60 s:\n{}",
                c.nspawn_log()
            )
        });
        let started = start.elapsed();
        // Before its bus is up, systemctl fails or says "offline" at once.
        let state = poll(Duration::from_secs(60), 50, || {
            let state = c.sh("systemctl is-system-running --wait");
            let up = !matches!(state.stdout.trim(), "offline" | "");
            up.then_some(state)
        });
        let state = state.unwrap_or_else(|| c.sh("systemctl is-system-running --wait"));
        assert!(
            state.stdout.trim() == "running",
            "the container did not come up cleanly ({state}); failed units:\n{}",
            c.sh("systemctl --failed --no-pager").stdout
        );
        let lo = c.ok("cat /sys/class/net/lo/flags");
        let lo = u32::from_str_radix(lo.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        assert!(
            lo & 1 == 1,
            "the container's loopback is down (systemd-nspawn could not bring it up): the tests need 127.0.0.1"
        );
        // For reports (cargo test -- --nocapture), not an assertion.
        let (pid1_s, up_s) = (started.as_secs_f64(), start.elapsed().as_secs_f64());
        eprintln!(
            "{}: PID 1 after {pid1_s:.2} s, running after {up_s:.2} s",
            c.machine
        );
        c
    }

    fn nspawn_log(&self) -> String {
        fs::read_to_string(self.scratch.join("nspawn.log")).unwrap_or_default()
    }

    /// Runs a shell script inside the container as root, with a plain
    /// environment.
    fn sh(&self, script: &str) -> Ran {
        let pid1 = self.pid1.to_string();
        let env = [
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
        ];
        run_deadline(
            Command::new("nsenter")
                .args(["-t", &pid1, "-a", "/usr/bin/env", "-i"])
                .args(env)
                .args(["/bin/sh", "-c", script]),
            COMMAND_DEADLINE,
        )
    }

    /// [`Container::sh`] that must succeed; returns its stdout.
    fn ok(&self, script: &str) -> String {
        let ran = self.sh(script);
        assert!(ran.ok(), "in the container: {script}\n{ran}");
        ran.stdout
    }

    /// Writes a file inside the container (through its root, from the host).
    fn write(&self, path: &str, text: &str) {
        let host = PathBuf::from(format!("/proc/{}/root{path}", self.pid1));
        if let Some(dir) = host.parent() {
            fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("mkdir {} in the container: {e}", dir.display()));
        }
        fs::write(&host, text).unwrap_or_else(|e| panic!("write {path} in the container: {e}"));
    }

    /// Writes an executable script inside the container.
    fn write_script(&self, path: &str, text: &str) {
        self.write(path, text);
        self.ok(&format!("chmod 755 {path}"));
    }

    /// The service's journal, for failure messages.
    fn journal(&self) -> String {
        let ran = self.sh(&format!(
            "journalctl --no-pager -o short-monotonic -u {UNIT}.service -u {UNIT}.socket -u nix-daemon.service | tail -n 40"
        ));
        ran.stdout
    }

    /// Waits (bounded by `deadline`, a correctness bound) until `done`
    /// holds; on a timeout the failure shows the service's journal.
    fn wait_for(&self, deadline: Duration, what: &str, mut done: impl FnMut() -> bool) {
        let check = || done().then_some(()).ok_or_else(|| "not yet".to_string());
        wait_until_ok(deadline, what, check, || self.journal());
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.pid1 != 0 {
            // Bounded: a wedged container must not hang the test run.
            let poweroff = Command::new("nsenter")
                .args(["-t", &self.pid1.to_string(), "-a", "systemctl", "poweroff"])
                .arg("--no-block")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            if let Ok(mut child) = poweroff {
                reap(&mut child, Duration::from_secs(10));
            }
        }
        reap(&mut self.nspawn, Duration::from_secs(20));
        // Whatever is left in the cgroups (nothing, after a clean poweroff),
        // then the cgroups themselves, deepest first.
        for dir in &self.cgroups {
            in_cgroup(dir, &|d| {
                let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        }
        for dir in &self.cgroups {
            in_cgroup(dir, &|d| drop(fs::remove_dir(d)));
        }
        let _ = fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&self.machine));
        if std::env::var_os("NPBHQ_KEEP_TMP").is_none() {
            let _ = fs::remove_dir_all(&self.scratch);
        }
    }
}

/// Waits for `child` to exit, and kills it if it still runs after `within`.
fn reap(child: &mut Child, within: Duration) {
    if poll(within, 20, || child.try_wait().ok()?).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Calls `f` on every cgroup under `dir`, deepest first, and on `dir` last.
fn in_cgroup(dir: &Path, f: &dyn Fn(&Path)) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            in_cgroup(&e.path(), f);
        }
    }
    f(dir);
}

/// What the tests set up besides the module: the Nix daemon's configuration
/// (no sandbox and no substituters, as in the host tier; the test key
/// trusted for the ssh-ng receiver; reachable by every user, as on NixOS),
/// the signing key.
fn prepare_nix(c: &Container, module: &Rendered) {
    c.ok(
        "mkdir -p /etc/npbhq-test && chmod 700 /etc/npbhq-test && \
         nix-store --generate-binary-cache-key npbhq-test /etc/npbhq-test/signing-key /etc/npbhq-test/signing-key.pub",
    );
    let public = c.ok(&format!("cat {PUBLIC_KEY}"));
    let (public, from_module) = (public.trim(), module.part("nix.conf"));
    let conf = format!(
        "sandbox = false\nsubstituters =\nexperimental-features = nix-command\n\
         trusted-public-keys = {public}\n{from_module}"
    );
    c.write("/etc/nix/nix.conf", &conf);
    // Debian lets only the group nix-users reach the nix-daemon (its
    // directory is 0770); NixOS lets everyone connect (allowed-users
    // decides). As on NixOS:
    c.write(
        "/etc/tmpfiles.d/nix-daemon.conf",
        "d /nix/var/nix/daemon-socket 0755 root root\n",
    );
    c.ok("chmod 755 /nix/var/nix/daemon-socket");
    c.ok("systemctl stop nix-daemon.service nix-daemon.socket && systemctl start nix-daemon.socket || { journalctl -n 30 --no-pager; exit 1; }");
}

/// Writes users, files, tmpfiles rules and units of `module`, as NixOS's
/// activation does: users and groups, then tmpfiles, then the units.
fn install_module(c: &Container, module: &Rendered) {
    for group in module.part("groups").lines() {
        c.ok(&format!(
            "getent group {group} || groupadd --system {group}"
        ));
    }
    for line in module.part("users").lines() {
        let name = line.split_whitespace().next().expect("user name");
        let field = |key: &str| {
            let value = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")));
            value.unwrap_or_else(|| panic!("users line without {key}: {line}"))
        };
        c.ok(&format!(
            "getent passwd {name} || useradd --system --gid {} --home-dir {} --no-create-home --shell /usr/sbin/nologin {name}",
            field("group"),
            field("home")
        ));
    }
    for (path, text) in module.of_kind("file") {
        c.write(path, text);
    }
    let tmpfiles = format!("/etc/tmpfiles.d/{UNIT}.conf");
    c.write(&tmpfiles, module.part("tmpfiles"));
    c.ok(&format!("systemd-tmpfiles --create {tmpfiles}"));
    for (name, text) in module.of_kind("unit") {
        c.write(&format!("/etc/systemd/system/{name}"), text);
    }
    c.ok("systemctl daemon-reload");
}

/// Enables the module's units (as NixOS links them into sockets.target and
/// multi-user.target) and starts them.
const START_UNITS: &str =
    "systemctl enable nix-post-build-hook-queue.socket nix-post-build-hook-queue.service && \
     systemctl start nix-post-build-hook-queue.socket nix-post-build-hook-queue.service";

/// A fresh start of the module's units ([`START_UNITS`]), which must succeed.
fn start_module(c: &Container) {
    let ran = c.sh(START_UNITS);
    let log = c.journal();
    assert!(ran.ok(), "the module's units did not start: {ran}\n{log}");
}

/// A container with `variant` installed and running.
fn boot_with(tag: &str, variant: &str) -> (Container, Rendered) {
    let module = Rendered::load(&rendered_dir(), variant);
    let c = Container::boot(tag);
    prepare_nix(&c, &module);
    install_module(&c, &module);
    (c, module)
}

/// Builds a distinct one-file derivation as root through the nix-daemon
/// (which runs the post-build-hook, as root); returns its output path.
fn build(c: &Container, tag: &str) -> String {
    build_as(c, "root", tag, "")
}

/// [`build`] by `user` (a client of the nix-daemon like any other: the
/// daemon runs the hook, as root, whoever asked for the build), whose
/// output also holds the Nix expression `with` (a dependency).
fn build_as(c: &Container, user: &str, tag: &str, with: &str) -> String {
    let nonce = unique_id();
    let out = c.ok(&format!(
        "cd / && runuser -u {user} -- env HOME=/tmp NIX_REMOTE=daemon nix-build --no-out-link -E 'derivation {{ name = \"npbhq-{tag}\"; \
         system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {with} {nonce} > $out\" ]; }}'"
    ));
    let path = out.lines().last().unwrap_or_default().trim().to_string();
    assert!(
        path.starts_with("/nix/store/"),
        "nix-build printed no store path: {out}"
    );
    path
}

/// Whether `path` is in `store` with a signature the test key verifies.
fn verified_in(c: &Container, store: &str, path: &str) -> Result<(), String> {
    verified_by(c, PUBLIC_KEY, store, path)
}

/// Whether `path` is in `store` with a signature the public key in the
/// file `key` verifies.
fn verified_by(c: &Container, key: &str, store: &str, path: &str) -> Result<(), String> {
    let ran = c.sh(&format!(
        "nix store verify --no-contents --store '{store}' --trusted-public-keys \"$(cat {key})\" {path}"
    ));
    ran.ok().then_some(()).ok_or_else(|| ran.to_string())
}

/// [`verified_in`] for each path, which must hold.
fn assert_verified(c: &Container, store: &str, paths: &[String]) {
    for p in paths {
        verified_in(c, store, p).unwrap_or_else(|e| panic!("{p}: {e}\n{}", c.journal()));
    }
}

/// Whether the file:// cache has `path`'s narinfo, looked at without nix:
/// root's nix would create the cache's files, owned by root, and the
/// daemon's user could then no longer write there.
fn in_cache_dir(c: &Container, path: &str) -> bool {
    let hash = path.trim_start_matches("/nix/store/").split('-').next();
    let narinfo = format!("{CACHE_DIR}/{}.narinfo", hash.unwrap_or_default());
    c.sh(&format!("test -e {narinfo}")).ok()
}

/// Waits until every path is in the file:// cache, then verifies each
/// with the test key.
fn wait_delivered(c: &Container, paths: &[String]) {
    for p in paths {
        c.wait_for(DELIVERY_DEADLINE, &format!("{p} in {CACHE_DIR}"), || {
            in_cache_dir(c, p)
        });
    }
    assert_verified(c, CACHE_URL, paths);
}

/// `wait` as root, which must end with every path uploaded.
fn wait_all(c: &Container) {
    let waited = daemon(c, "wait --timeout 100");
    assert!(waited.ok(), "wait: {waited}\n{}", c.journal());
}

/// Sleeps longer than the service's RestartSec: long enough for systemd
/// to have restarted it, had it meant to.
fn sleep_past_restart_sec(module: &Rendered) {
    let restart_sec = module
        .service_value("RestartSec")
        .and_then(|v| v.parse().ok());
    let restart_sec: f64 = restart_sec.expect("RestartSec");
    thread::sleep(Duration::from_secs_f64(restart_sec + 2.0));
}

/// The service is up and was never restarted: checked longer than
/// RestartSec after it last served, as an operator would.
fn assert_stays_up(c: &Container, module: &Rendered) {
    sleep_past_restart_sec(module);
    let props = c.ok(&format!(
        "systemctl show -p NRestarts,ActiveState,SubState,Result,ExecMainStatus {UNIT}.service"
    ));
    let up = props.contains("NRestarts=0") && props.contains("ActiveState=active");
    assert!(up, "the service did not stay up:\n{props}\n{}", c.journal());
}

fn daemon(c: &Container, args: &str) -> Ran {
    c.sh(&format!("/opt/npbhq/bin/post-build-hook-queue {args}"))
}

/// `nix copy` to the ssh-ng receiver with root's key, of what follows.
const SSH_COPY: &str = "NIX_SSHOPTS='-i /etc/npbhq-test/ssh-key -o BatchMode=yes' nix copy --to 'ssh-ng://root@127.0.0.1?remote-store=/srv/receiver'";

/// The ssh-ng receiver: root's ssh key runs an untrusted nix-daemon on its
/// own store at [`RECEIVER`] (as `nix.sshServe` does), with `options`, so a
/// path is accepted only with a signature by a key in the receiver's
/// trusted-public-keys. (A trusted one, as root's own `nix-daemon --stdio`
/// is, takes any locally built path unsigned.)
fn ssh_receiver(c: &Container, options: &str) {
    c.ok(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f /etc/npbhq-test/ssh-key && \
         install -d -m 700 /root/.ssh && \
         echo \"restrict,command=\\\"nix-daemon --extra-experimental-features daemon-trust-override --stdio --force-untrusted --store {RECEIVER}{options}\\\" $(cat /etc/npbhq-test/ssh-key.pub)\" > /root/.ssh/authorized_keys && \
         echo \"127.0.0.1 $(cat /etc/ssh/ssh_host_ed25519_key.pub)\" > /etc/ssh/ssh_known_hosts && \
         mkdir -p {RECEIVER} && systemctl restart ssh.service"
    ));
}

#[test]
fn rendered_units_match_module_nix() {
    let source = fs::read_to_string(repo().join("tests/system/rendered/source.txt"))
        .expect("tests/system/rendered/source.txt");
    for file in ["module.nix", "tests/system/render.nix"] {
        let recorded = line_after(&source, &format!("{file} "));
        let recorded = recorded.unwrap_or_else(|| panic!("source.txt records no hash of {file}"));
        let out = run_ok(Command::new("sha256sum").arg(repo().join(file)));
        let now = out.split_whitespace().next().unwrap_or_default();
        assert_eq!(
            recorded, now,
            "{file} changed since tests/system/rendered/ was rendered: run tests/system/render.sh NIXPKGS_LIB (see its header)"
        );
    }
}

#[test]
fn rendered_module_facts() {
    let fact = rendered_check;
    // Facts that must be true, as render.nix names them.
    let true_facts = "default-user-created nix-pb-user-created normal-user-left-alone \
        known-settings-key-accepted unknown-settings-key-fails module-owned-key-fails \
        old-nix-signing-untrusted-fails key-in-store-fails \
        environment-file-in-store-fails empty-upload-to-fails \
        empty-upload-to-in-list-fails null-upload-to-accepted negative-timeout-fails \
        zero-delay-fails zero-delay-string-fails give-up-never-accepted \
        empty-upload-command-fails bare-upload-command-fails \
        absolute-upload-command-accepted warns-when-it-only-journals quiet-with-a-target \
        warns-when-signed-twice config-check-off config-check-cross \
        overlaid-package-runs overlaid-package-installed default-package-installed";
    for name in true_facts.split_whitespace() {
        assert_eq!(fact(name), "true", "module.nix: {name}");
    }
    let (users, want) = (fact("extra-allowed-users"), "\"nix-post-build-hook-queue\"");
    assert_eq!(users, want, "nix-daemon must let the service user in");
    // A setting nobody set writes no line: the daemon's default applies.
    assert_eq!(
        fact("nothing-set-rendered"),
        "\"# nix-post-build-hook-queue configuration, generated by module.nix\\n\""
    );
    // What a rendered fact holds: a string from one module and a list from
    // another give both targets; the config file is built by a derivation
    // that runs the daemon's own check on it (tests/packaging.rs runs that
    // script); uploadTo as a list gives one `upload-to` line per target, as
    // the daemon reads several targets; a plain string, one line.
    for (name, line) in [
        ("merged-targets-rendered", "upload-to = file:///var/cache/a\\n"),
        ("merged-targets-rendered", "upload-to = ssh-ng://nix-ssh@mirror.example.com\\n"),
        ("config-check-script", "/bin/post-build-hook-queue check-config --config"),
        (
            "several-targets-rendered",
            "upload-to = file:///var/cache/a?compression=none\\nupload-to = ssh-ng://nix-ssh@mirror.example.com\\n",
        ),
        ("one-target-rendered", "upload-to = file:///var/cache/a\\n"),
        ("decimal-seconds-rendered", "command-timeout = 2.5\\n"),
        ("decimal-seconds-rendered", "retry-initial-delay = 1e-07\\n"),
        ("decimal-seconds-rendered", "retry-max-delay = 7.5\\n"),
    ] {
        let fact = fact(name);
        assert!(fact.contains(line), "{name}: {line} not in {fact}");
    }
    let one = fact("one-target-rendered");
    assert_eq!(one.matches("upload-to = ").count(), 1, "{one}");
    // Every rendered configuration: the socket root-only, the filter one
    // item a line (systemd ignores a `~` that does not start its line),
    // setpriority allowed after @resources is denied, stray calls EPERM,
    // a bad configuration not restarted, a stop that outlasts the daemon's
    // grace and leaves the nix call to the daemon.
    for variant in ["file", "ssh", "token", "group", "substitute"] {
        let r = Rendered::load(&rendered_dir(), variant);
        let service = r.unit(&format!("{UNIT}.service"));
        let filter = service
            .lines()
            .filter_map(|l| l.strip_prefix("SystemCallFilter="));
        let filter: Vec<&str> = filter.collect();
        let want = [
            "@system-service",
            "~@privileged",
            "~@resources",
            "setpriority",
        ];
        assert_eq!(filter, want, "{variant}");
        for line in [
            "SystemCallErrorNumber=EPERM",
            "RestartPreventExitStatus=78",
            "KillMode=mixed",
            "X-StopIfChanged=false",
        ] {
            assert!(service.lines().any(|l| l == line), "{variant}: no {line}");
        }
        let stop = r
            .service_value("TimeoutStopSec")
            .and_then(|v| v.parse().ok());
        let stop: u64 = stop.expect("TimeoutStopSec");
        assert!(
            stop > 10,
            "TimeoutStopSec={stop} is not longer than the daemon's 10 s grace"
        );
        let socket = r.unit(&format!("{UNIT}.socket"));
        let mode = if variant == "group" { "0660" } else { "0600" };
        assert!(
            socket.lines().any(|l| l == format!("SocketMode={mode}")),
            "{variant}: {socket}"
        );
        let group = socket.lines().any(|l| l == "SocketGroup=npbhq-ci");
        assert_eq!(group, variant == "group", "{variant}: {socket}");
        let env_file = r.service_value("EnvironmentFile").is_some();
        assert_eq!(env_file, variant == "token", "{variant}: EnvironmentFile=");
    }
}

/// The module's units on a real systemd: the hook runs in the nix-daemon
/// as root, the daemon (the module's unprivileged user) signs through the
/// nix-daemon and uploads to a file:// cache that did not exist, writes its
/// metrics, answers `status` and `wait` for root, and stays up.
#[test]
fn module_service_serves_signs_uploads_and_stays_up() {
    let c = Container::boot("serve");
    let module = Rendered::load(&rendered_dir(), "file");
    // Neither the cache nor the metrics directory exists: the module's
    // tmpfiles rules create them.
    c.ok(&format!(
        "test ! -e {CACHE_DIR} && test ! -e $(dirname {METRICS_FILE})"
    ));
    prepare_nix(&c, &module);
    // nix-daemon lets in only root and nobody (who builds below) besides
    // what the module adds (extra-allowed-users): the daemon's user signs
    // through nix-daemon all the same. Before the module's lines, as in
    // NixOS's nix.conf (sorted by key): a plain `allowed-users` after an
    // `extra-` line would replace what it added.
    let (conf, user) = (module.part("nix.conf"), module.user());
    assert!(
        conf.contains(&format!("extra-allowed-users = {user}")),
        "{conf}"
    );
    c.ok("sed -i '1i allowed-users = root nobody' /etc/nix/nix.conf && systemctl restart nix-daemon.service");
    install_module(&c, &module);
    start_module(&c);
    let socket = c.ok(&format!("stat -c '%U %a' /run/{UNIT}.sock"));
    assert_eq!(socket.trim(), "root 600", "the socket is root's alone");

    let mut paths: Vec<String> = (0..3).map(|i| build(&c, &format!("serve{i}"))).collect();
    // A user who cannot reach the socket (root's, 0600) builds too: the hook
    // runs in the nix-daemon, as root, so the path is queued all the same.
    let refused = c.sh(&format!(
        "runuser -u nobody -- /opt/npbhq/bin/post-build-hook-queue status --socket /run/{UNIT}.sock"
    ));
    assert!(!refused.ok(), "nobody reached the socket: {refused}");
    paths.push(build_as(&c, "nobody", "serve-nobody", ""));
    wait_all(&c);
    assert_verified(&c, CACHE_URL, &paths);
    // The verification means something: another key does not verify.
    c.ok("nix-store --generate-binary-cache-key other /tmp/other.sk /tmp/other.pk");
    let wrong = verified_by(&c, "/tmp/other.pk", CACHE_URL, &paths[0]);
    assert!(wrong.is_err(), "a wrong key verified {}", paths[0]);

    // Signed through the nix-daemon, by the module's user.
    let pid = c.ok(&format!("systemctl show -P MainPID {UNIT}.service"));
    let pid = pid.trim();
    let uid = c.ok(&format!("awk '/^Uid:/ {{print $2}}' /proc/{pid}/status"));
    let (uid, user_uid) = (uid.trim(), c.ok(&format!("id -u {user}")));
    assert_eq!(uid, user_uid.trim(), "the daemon runs as the module's user");
    assert_ne!(uid, "0");
    let sigs = c.ok(&format!("nix path-info --sigs {}", paths[0]));
    assert!(
        sigs.contains("npbhq-test:"),
        "no signature in the local store: {sigs}"
    );

    let status = daemon(&c, "status");
    assert!(status.ok(), "status as root: {status}");
    let json = daemon(&c, "status --json");
    assert!(
        json.stdout.contains("\"queued\":0") && json.stdout.contains("\"signing\":true"),
        "status --json: {json}"
    );
    wait_until_ok(
        Duration::from_secs(30),
        "the metrics file counts the uploads",
        || {
            let m = c.sh(&format!("cat {METRICS_FILE}")).stdout;
            let uploaded = line_after(&m, "nix_post_build_hook_queue_uploaded_total ");
            let uploaded = uploaded.and_then(|v| v.trim().parse::<f64>().ok());
            match uploaded {
                Some(n) if n >= paths.len() as f64 => Ok(()),
                _ => Err(m),
            }
        },
        || c.journal(),
    );
    assert_stays_up(&c, &module);

    let security = c.ok(&format!(
        "systemd-analyze security --no-pager {UNIT}.service | tail -n 1"
    ));
    let score = security
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next());
    let score: Option<f64> = score.and_then(|s| s.parse().ok());
    let score = score.unwrap_or_else(|| panic!("no exposure score in: {security}"));
    eprintln!("systemd-analyze security: {}", security.trim());
    assert!(score <= 1.0, "the sandbox got weaker: {}", security.trim());
}

/// Upload over ssh-ng to a receiver (sshd in the container, a separate
/// store) that requires signatures by the test key: it refuses an unsigned
/// path, and every path the hook queued arrives signed.
#[test]
fn module_service_uploads_over_ssh_ng_to_a_receiver_requiring_signatures() {
    let (c, module) = boot_with("ssh", "ssh");
    ssh_receiver(&c, "");
    // The receiver's own check, without our daemon: it refuses an unsigned
    // path, and takes the same path once it is signed with the test key
    // (so the refusal was about the signature, not the connection).
    // Built (input-addressed): a content-addressed path, as `nix-store
    // --add` makes, needs no signature anywhere. The service is not started
    // yet, so the hook spools it.
    let unsigned = build(&c, "unsigned");
    let copy = format!("{SSH_COPY} {unsigned}");
    let refused = c.sh(&copy);
    assert!(
        !refused.ok() && verified_in(&c, RECEIVER, &unsigned).is_err(),
        "the receiver accepted an unsigned path: {refused}"
    );
    c.ok(&format!(
        "nix store sign --key-file /etc/npbhq-test/signing-key {unsigned} && {copy}"
    ));
    verified_in(&c, RECEIVER, &unsigned).unwrap_or_else(|e| panic!("signed by hand: {e}"));
    start_module(&c);
    let paths: Vec<String> = (0..3).map(|i| build(&c, &format!("ssh{i}"))).collect();
    wait_all(&c);
    assert_verified(&c, RECEIVER, &paths);
    assert_stays_up(&c, &module);
}

/// Socket and service stopped: builds still succeed and the hook spools;
/// started again, everything arrives.
#[test]
fn builds_spool_while_stopped_and_arrive_after_start() {
    let (c, _module) = boot_with("spool", "file");
    start_module(&c);
    c.ok(&format!("systemctl stop {UNIT}.socket {UNIT}.service"));
    let paths: Vec<String> = (0..3).map(|i| build(&c, &format!("spool{i}"))).collect();
    let spooled = c.ok(&format!("cat {STATE_DIR}/spool/* 2>/dev/null || true"));
    for p in &paths {
        assert!(spooled.contains(p.as_str()), "{p} not spooled: {spooled}");
        assert!(!in_cache_dir(&c, p), "{p} uploaded while stopped");
    }
    c.ok(&format!("systemctl start {UNIT}.socket {UNIT}.service"));
    wait_delivered(&c, &paths);
    // The spooled requests were taken in: none is left to be read again.
    let left = c.ok(&format!("ls -A {STATE_DIR}/spool"));
    assert!(left.trim().is_empty(), "left in the spool: {left}");
}

/// A restart while `nix copy` runs (what a switch does to this unit: it
/// has `X-StopIfChanged=false`) loses nothing, and does not cut the upload
/// short: the daemon alone gets SIGTERM (`KillMode=mixed`) and lets the copy
/// finish within its grace, which systemd's stop timeout outlasts. The
/// upload is held open by a wrapper around the real nix (`settings.nix`)
/// that notes each copy and waits 4 s before it.
#[test]
fn restart_in_the_middle_of_an_upload_loses_nothing() {
    let (c, module) = boot_with("restart", "file");
    // The module's config file, with the slow nix: a changed configuration
    // of the same module (settings.nix), written where the unit reads it.
    c.write_script(
        "/usr/local/bin/npbhq-slow-nix",
        "#!/bin/sh\ncase \" $* \" in *\" copy \"*) echo copy >> \"$HOME/copies\"; sleep 4;; esac\nexec /usr/bin/nix \"$@\"\n",
    );
    append_to_config(&c, &module, "nix = /usr/local/bin/npbhq-slow-nix");
    // Built before the daemon first starts: the hook spools both, and the
    // daemon uploads them in one `nix copy`.
    let paths: Vec<String> = (0..2).map(|i| build(&c, &format!("restart{i}"))).collect();
    start_module(&c);
    let copies = || {
        let copies = c.sh(&format!("cat {STATE_DIR}/copies")).stdout;
        copies.lines().count()
    };
    c.wait_for(Duration::from_secs(60), "an upload in progress", || {
        copies() > 0
    });
    c.ok(&format!("systemctl restart {UNIT}.service"));
    wait_delivered(&c, &paths);
    let json = daemon(&c, "status --json");
    assert!(json.stdout.contains("\"queued\":0"), "{json}");
    let cut = "the copy in progress at the restart was cut short and had to run again";
    assert_eq!(copies(), 1, "{cut}\n{}", c.journal());
}

/// What `nixos-rebuild switch` does to a changed socket-activated unit
/// with stopIfChanged (stop the service and the socket, activate, start the
/// socket and the targets that are active) drains the queue left behind,
/// without a client touching the socket.
#[test]
fn switch_to_a_changed_unit_drains_the_queue() {
    let (c, module) = boot_with("switch", "file");
    start_module(&c);
    // Paths queued while the upload target is unwritable: they wait.
    c.ok(&format!("chmod 000 {CACHE_DIR}"));
    let paths: Vec<String> = (0..3).map(|i| build(&c, &format!("switch{i}"))).collect();
    let queued = || {
        let json = daemon(&c, "status --json").stdout;
        json.contains("\"queued\":3").then_some(()).ok_or(json)
    };
    let minute = Duration::from_secs(60);
    wait_until_ok(minute, "three paths queued", queued, || c.journal());
    // The switch: stop the service and the socket, activate the changed
    // configuration (here the service unit gains an environment line),
    // start the socket and the active targets.
    c.ok(&format!("systemctl stop {UNIT}.service {UNIT}.socket"));
    c.ok(&format!("chmod 755 {CACHE_DIR}"));
    let service = format!("/etc/systemd/system/{UNIT}.service");
    let changed = module.unit(&format!("{UNIT}.service")).replacen(
        "[Service]\n",
        "[Service]\nEnvironment=\"NPBHQ_TEST_GENERATION=2\"\n",
        1,
    );
    c.write(&service, &changed);
    c.ok("systemctl daemon-reload");
    c.ok(&format!("systemctl start {UNIT}.socket multi-user.target"));
    wait_delivered(&c, &paths);
}

/// Where the container tiers cannot run, they say why in one line: here
/// without CAP_NET_ADMIN (dropped from the bounding set, so that neither
/// the script nor this test binary run under it has it), instead of six
/// tests failing with `sshd did not listen on port N`.
#[test]
fn container_tiers_say_in_one_line_why_they_cannot_run() {
    let without = |program: &Path, args: &[&str]| {
        run_deadline(
            Command::new("setpriv")
                .args(["--bounding-set=-net_admin", "--"])
                .arg(program)
                .args(args),
            Duration::from_secs(600),
        )
    };
    let suite = without(
        &repo().join("tests/system/run-suite-in-container.sh"),
        &["--test", "harness_selfcheck"],
    );
    assert!(!suite.ok(), "{suite}");
    let lines = suite.stderr.trim().lines().count();
    assert_eq!(lines, 1, "not one line: {suite}");
    assert!(suite.stderr.contains("no CAP_NET_ADMIN"), "{suite}");
    // This test binary, one container test of its own.
    let me = std::env::current_exe().expect("the test binary");
    let test = "builds_spool_while_stopped_and_arrive_after_start";
    let tier = without(&me, &["--exact", test, "--test-threads=1"]);
    let (said, why) = (
        tier.to_string(),
        "the system tier cannot run here: no CAP_NET_ADMIN",
    );
    assert!(!tier.ok(), "{said}");
    assert!(said.lines().any(|l| l.starts_with(why)), "{said}");
}

/// The module's config file with one more line, written where the unit
/// reads it (the store file the rendered ExecStart names).
fn append_to_config(c: &Container, module: &Rendered, line: &str) {
    let (path, text) = module.config_file();
    c.write(path, &format!("{text}{line}\n"));
}

/// A configuration error stops the service for good: the daemon exits 78
/// (EX_CONFIG) and systemd does not restart it (`RestartPreventExitStatus`),
/// where a restart could only fail the same way.
#[test]
fn a_configuration_error_exits_78_and_is_not_restarted() {
    let (c, module) = boot_with("exit78", "file");
    append_to_config(&c, &module, "batch-size = 0");
    let started = c.sh(START_UNITS);
    assert!(!started.ok(), "started with batch-size = 0: {started}");
    sleep_past_restart_sec(&module);
    let props = c.ok(&format!(
        "systemctl show -p NRestarts,ActiveState,Result,ExecMainStatus {UNIT}.service"
    ));
    for want in ["ExecMainStatus=78", "NRestarts=0", "ActiveState=failed"] {
        assert!(
            props.lines().any(|l| l == want),
            "want {want}:\n{props}\n{}",
            c.journal()
        );
    }
}

/// An uploader that needs a token (as cachix and attic do) gets it from
/// the module's `environmentFile`: without the token there every upload
/// fails; with it, after a restart (systemd reads the file at start), the
/// path arrives. The token shows nowhere in `status`.
#[test]
fn upload_command_gets_its_token_from_the_environment_file() {
    let (c, module) = boot_with("token", "token");
    let command = module.setting("upload-command").expect("upload-command");
    let uploaded = command.split_whitespace().last().expect("the --to file");
    // The uploader: refuses (and notes it) without NPBHQ_TEST_TOKEN=sekrit
    // in its environment, else records the paths it was given.
    c.write_script(
        "/usr/local/bin/npbhq-token-upload",
        "#!/bin/sh\n[ \"$1\" = --to ] || exit 2\nout=$2; shift 2\n\
         if [ \"$NPBHQ_TEST_TOKEN\" != sekrit ]; then echo refused >> \"$out.refused\"; \
         echo 'npbhq-token-upload: no token' >&2; exit 1; fi\n\
         for p; do echo \"$p\" >> \"$out\"; done\n",
    );
    c.write("/etc/npbhq-test/uploader.env", "NPBHQ_TEST_OTHER=1\n");
    c.ok("chmod 600 /etc/npbhq-test/uploader.env");
    start_module(&c);
    let path = build(&c, "token");
    c.wait_for(DELIVERY_DEADLINE, "the uploader's refusal", || {
        c.sh(&format!("test -s {uploaded}.refused")).ok()
    });
    let none = c.sh(&format!("cat {uploaded}"));
    assert!(!none.stdout.contains(&path), "uploaded without: {none}");
    c.write(
        "/etc/npbhq-test/uploader.env",
        "NPBHQ_TEST_OTHER=1\nNPBHQ_TEST_TOKEN=sekrit\n",
    );
    c.ok(&format!("systemctl restart {UNIT}.service"));
    wait_all(&c);
    let list = c.ok(&format!("cat {uploaded}"));
    let arrived = list.lines().any(|l| l == path);
    assert!(arrived, "{path} not uploaded: {list}\n{}", c.journal());
    for args in ["status", "status --json"] {
        let status = daemon(&c, args);
        let said = status.to_string();
        assert!(status.ok() && !said.contains("sekrit"), "{args}: {said}");
    }
}

/// `socketGroup`: a member of the group, a CI job that holds no keys,
/// pushes a path it substituted (which no post-build-hook saw) with
/// `enqueue ./result` and `wait`s for it, through the socket the module's
/// `NPBHQ_SOCKET` names; its `drop` is refused. A user outside the group
/// does not reach the socket.
#[test]
fn socket_group_members_enqueue_and_wait_but_may_not_drop() {
    let (c, module) = boot_with("group", "group");
    let variables = module.part("variables");
    assert!(
        variables.starts_with("NPBHQ_SOCKET=/"),
        "the module names the socket for the group: {variables}"
    );
    let socket_unit = module.unit(&format!("{UNIT}.socket"));
    let group = line_after(socket_unit, "SocketGroup=").expect("SocketGroup=");
    start_module(&c);
    let socket = c.ok(&format!("stat -c '%U %G %a' /run/{UNIT}.sock"));
    assert_eq!(socket.trim(), format!("root {group} 660"));
    // An upstream cache holding a path this machine no longer has: content
    // addressed (`nix-store --add`, no build, so no hook), so that it needs
    // no signature to be substituted.
    let path = c.ok(&format!(
        "echo {} > /tmp/payload && nix-store --add /tmp/payload",
        unique_id()
    ));
    let path = path.trim();
    c.ok(&format!(
        "nix copy --to file:///srv/upstream {path} && nix-store --delete {path} && \
         echo 'substituters = file:///srv/upstream' >> /etc/nix/nix.conf && \
         systemctl restart nix-daemon.service"
    ));
    c.ok(&format!("useradd -m -G {group} ci"));
    let as_ci = |script: &str| {
        c.sh(&format!(
            "cd /home/ci && runuser -u ci -- env HOME=/home/ci NIX_REMOTE=daemon {} sh -c '{script}'",
            variables.trim().replace('\n', " ")
        ))
    };
    let as_ci_ok = |script: &str| {
        let (ran, log) = (as_ci(script), c.journal());
        assert!(ran.ok(), "{script} as a member of {group}: {ran}\n{log}");
    };
    as_ci_ok(&format!("nix-store --realise {path} --add-root result"));
    as_ci_ok("/opt/npbhq/bin/post-build-hook-queue enqueue ./result");
    as_ci_ok("/opt/npbhq/bin/post-build-hook-queue wait --timeout 100");
    wait_delivered(&c, &[path.to_string()]);
    as_ci_ok("/opt/npbhq/bin/post-build-hook-queue status");
    let dropped = as_ci(&format!("/opt/npbhq/bin/post-build-hook-queue drop {path}"));
    assert_eq!(
        dropped.status.code(),
        Some(1),
        "drop as a member of {group} must be refused by the daemon: {dropped}"
    );
    let outsider = c.sh(&format!(
        "runuser -u nobody -- env {} /opt/npbhq/bin/post-build-hook-queue status",
        variables.trim()
    ));
    assert!(
        !outsider.ok(),
        "nobody, outside {group}, reached the socket: {outsider}"
    );
}

/// `substitute-on-destination`: the ssh-ng receiver fetches a dependency
/// from its own substituter (a file:// "upstream" signed by a key of its
/// own) instead of over ssh. The ssh path cannot carry it: the dependency
/// has no signature here (built here, `sign-closure = false`), and the
/// receiver takes only signed paths. So the built path arriving at all
/// means the dependency came from upstream, which its signature confirms.
#[test]
fn substitute_on_destination_fetches_dependencies_from_the_receivers_cache() {
    let (c, module) = boot_with("subst", "substitute");
    assert_eq!(module.setting("substitute-on-destination"), Some("true"));
    c.ok(
        "nix-store --generate-binary-cache-key npbhq-upstream /etc/npbhq-test/upstream.sk /etc/npbhq-test/upstream.pk && \
         echo \"extra-trusted-public-keys = $(cat /etc/npbhq-test/upstream.pk)\" >> /etc/nix/nix.conf",
    );
    // The receiver, whose nix-daemon substitutes from the upstream cache.
    ssh_receiver(&c, " --option substituters file:///srv/upstream");
    // The dependency: built here, unsigned (the service is not started: the
    // hook spools it, and the spool is emptied, so only the top path is
    // queued), and put in the upstream cache signed by the upstream key.
    let dep = build(&c, "subst-dep");
    c.ok(&format!(
        "rm -f {STATE_DIR}/spool/* && \
         nix copy --to 'file:///srv/upstream?secret-key=/etc/npbhq-test/upstream.sk' {dep}"
    ));
    // Over ssh alone the receiver refuses it (unsigned here).
    let copy = c.sh(&format!("{SSH_COPY} {dep}"));
    assert!(
        !copy.ok() && verified_in(&c, RECEIVER, &dep).is_err(),
        "the receiver took the unsigned dependency over ssh: {copy}"
    );
    start_module(&c);
    let with_dep = format!("${{builtins.storePath \"{dep}\"}}");
    let top = build_as(&c, "root", "subst-top", &with_dep);
    let refs = c.ok(&format!("nix-store -q --references {top}"));
    assert!(
        refs.contains(&dep),
        "{top} does not depend on {dep}: {refs}"
    );
    wait_all(&c);
    assert_verified(&c, RECEIVER, &[top]);
    let sigs = c.ok(&format!("nix path-info --sigs --store {RECEIVER} {dep}"));
    assert!(
        sigs.contains("npbhq-upstream:"),
        "the receiver's {dep} did not come from upstream: {sigs}"
    );
    assert!(
        !sigs.contains("npbhq-test:"),
        "the dependency was signed here: {sigs}"
    );
}

/// tests/system/mkroot.sh takes the Debian mirror from this machine's own
/// apt sources (no mirror's host name is written in the repository): run
/// with a stand-in `debootstrap` that records its arguments and fails, it
/// passes a mirror found in /etc/apt.
#[test]
fn mkroot_takes_the_mirror_from_the_machines_apt_sources() {
    let scratch = TempDir::new("mkroot");
    let bin = scratch.join("bin");
    fs::create_dir_all(&bin).expect("scratch dir");
    let fake = bin.join("debootstrap");
    write_script(&fake, "#!/bin/sh\necho \"debootstrap-args: $*\"\nexit 1\n");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ran = run_deadline(
        Command::new(repo().join("tests/system/mkroot.sh"))
            .env("PATH", path)
            .env_remove("NPBHQ_DEBIAN_MIRROR")
            .env("NPBHQ_ROOTFS", scratch.join("root")),
        COMMAND_DEADLINE,
    );
    assert!(!ran.ok(), "{ran}");
    let mirror = line_after(&ran.stderr, "debootstrap-args: ");
    let mirror = mirror.and_then(|args| args.split_whitespace().last());
    let mirror = mirror.unwrap_or_else(|| panic!("debootstrap was not run: {ran}"));
    let dir = fs::read_dir("/etc/apt/sources.list.d");
    let lists = dir.into_iter().flatten().flatten().map(|e| e.path());
    let lists = lists.chain(["/etc/apt/sources.list".into()]);
    let sources: String = lists
        .map(|f| fs::read_to_string(f).unwrap_or_default())
        .collect();
    assert!(
        mirror.contains("://") && sources.contains(mirror.trim_end_matches('/')),
        "the mirror {mirror} is not one of this machine's apt sources"
    );
    let script = fs::read_to_string(repo().join("tests/system/mkroot.sh")).expect("mkroot.sh");
    let host = mirror
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    assert!(
        !host.is_empty() && !script.contains(host),
        "mkroot.sh names the mirror's host {host}"
    );
}
