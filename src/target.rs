//! The upload targets, and the check at start of each URL: one nix can never
//! use stops the daemon; one that may mend (a host that does not answer) warns.

use std::sync::mpsc;
use std::time::Duration;

use crate::config::Config;
use crate::journal::TargetId;
use crate::nix::{Failure, FailureKind, Nix, PING_TIMEOUT};
use crate::{info, redact, warning};

/// Where paths are delivered to: a store URL for `nix copy --to`, an uploader's
/// program and arguments (the paths appended), or nowhere (they are only signed).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Kind {
    Url(String),
    Command(Vec<String>),
    SignOnly,
}

/// One target: what it is, its journal name and its label (secrets masked).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Target {
    pub kind: Kind,
    pub id: TargetId,
    pub label: String,
}

impl Target {
    /// A target named `name` in the journal, its secrets remembered to be masked everywhere.
    fn new(kind: Kind, name: Option<&str>) -> Target {
        name.inspect(|name| redact::remember(name));
        let label = name.map_or_else(|| "-".into(), redact::text);
        let id = TargetId::of(name);
        Target { kind, id, label }
    }

    /// The `upload-to` target at `url`.
    pub fn url(url: &str) -> Target {
        Target::new(Kind::Url(url.to_string()), Some(url))
    }

    /// Signing only, when no target is configured.
    pub fn sign_only() -> Target {
        Target::new(Kind::SignOnly, None)
    }
}

/// The targets of `config`: each `upload-to`, then the `upload-command`; or signing only.
pub fn configured(config: &Config) -> Vec<Target> {
    let mut targets: Vec<Target> = config.upload_to.iter().map(|u| Target::url(u)).collect();
    if let Some(argv) = &config.upload_command {
        let line = format!("upload-command: {}", argv.join(" "));
        targets.push(Target::new(Kind::Command(argv.clone()), Some(&line)));
    }
    if targets.is_empty() {
        targets.push(Target::sign_only());
    }
    targets
}

/// Checks every `upload-to` URL in turn; `Err`: why the daemon cannot run with one.
pub fn check_at_start(config: &Config) -> Result<(), String> {
    for url in &config.upload_to {
        let nix = Nix::from_config(config, Some(url), Default::default());
        // Handed over only while start-up waits; judged by the check after.
        let (tx, rx) = mpsc::sync_channel(0);
        let (url, shown) = (url.clone(), url.as_str());
        let check = move || {
            let _ = crate::nix::lower_priority();
            if let Err(mpsc::SendError(result)) = tx.send(nix.ping(&url, PING_TIMEOUT)) {
                if let Err(e) = judge(&url, result) {
                    crate::error!("{e}; the daemon keeps running, but uploads will fail until upload-to is corrected");
                }
            }
        };
        let thread = std::thread::Builder::new().name("target-check".into());
        let started = thread.spawn(check);
        started.map_err(|e| format!("cannot start the check of a target: {e}"))?;
        // Start-up waits 3 s per URL; a dead host's check is judged in the background.
        if let Ok(result) = rx.recv_timeout(Duration::from_secs(3)) {
            judge(shown, result)?;
        }
    }
    Ok(())
}

/// `Err` when the target can never work: nix could not be started, the URL is not
/// a store URL, or nix does not know the kind of store (Nix 2.0 to 2.26's wording).
fn judge(url: &str, result: Result<(), Failure>) -> Result<(), String> {
    let shown = redact::text(url);
    let Err(failure) = result else {
        info!("target {shown}: nix can open it");
        return Ok(());
    };
    let reason = redact::text(&failure.to_string());
    let never = matches!(failure.kind, FailureKind::Spawn(_)) || !is_store_url(url);
    if never || failure.stderr.contains("don't know how to open") {
        return Err(format!(
            "upload-to {shown}: nix cannot use this store URL: {reason} (store URLs look like \
             file:///var/cache/nix, ssh-ng://host, s3://bucket or https://host/path)"
        ));
    }
    warning!("upload-to {shown}: the target cannot be opened now ({reason}); starting anyway, and uploads are retried until it answers");
    Ok(())
}

/// True for the forms a Nix store URL takes: `auto`, `daemon`, `local`, an
/// absolute path, or `scheme://...`, each maybe followed by `?params`.
fn is_store_url(url: &str) -> bool {
    let base = url.split_once('?').map_or(url, |(b, _)| b);
    let Some((scheme, rest)) = base.split_once("://") else {
        return matches!(base, "auto" | "daemon" | "local") || base.starts_with('/');
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c))
        && !rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit_failure(stderr: &str) -> Failure {
        Failure {
            what: "nix store ping",
            kind: FailureKind::Exit("exit status 1".into()),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn store_url_forms() {
        for ok in [
            "file:///tmp/c?compression=none",
            "ssh-ng://u@h",
            "s3://bucket?region=eu-west-1",
            "https://cache.example.org",
            "local",
            "daemon",
            "/var/cache",
            "local?root=/x",
        ] {
            assert!(is_store_url(ok), "{ok}");
        }
        for bad in [
            "cache.example.org",
            "file:/tmp/c",
            "http//x",
            "File:///x",
            "://x",
            "ssh://",
            "",
        ] {
            assert!(!is_store_url(bad), "{bad}");
        }
    }

    #[test]
    fn unknown_kinds_of_store_stop_the_daemon_unreachable_ones_do_not() {
        // Nix 2.8 and Nix 2.26's wordings.
        for stderr in [
            "error: don't know how to open Nix store 'fiel:///tmp/cache'",
            "error: don't know how to open Nix store with scheme 'fiel'",
        ] {
            let e = judge("fiel:///tmp/cache", Err(exit_failure(stderr))).unwrap_err();
            assert!(e.starts_with("upload-to fiel:///tmp/cache: "), "{e}");
            assert!(e.contains(stderr), "nix's reason: {e}");
        }
        let e = judge("cache.example.org", Err(exit_failure("error: x"))).unwrap_err();
        assert!(e.contains("store URLs look like"), "{e}");
        let spawn = Failure {
            what: "nix store ping",
            kind: FailureKind::Spawn("No such file or directory".into()),
            stderr: String::new(),
        };
        assert!(judge("file:///x", Err(spawn)).is_err());
        let down = exit_failure("error: cannot connect to 'u:pw@h'");
        assert_eq!(judge("ssh://u:pw@h", Err(down)), Ok(()));
        let not_dir = exit_failure("error: '/dev/null' is not a directory");
        assert_eq!(judge("file:///dev/null/x", Err(not_dir)), Ok(()));
        assert_eq!(judge("file:///x", Ok(())), Ok(()));
    }

    #[test]
    fn secrets_are_masked_in_the_reason() {
        let failure = exit_failure("error: don't know how to open Nix store 'zz://u:hunter2@h'");
        let e = judge("zz://u:hunter2@h", Err(failure)).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn labels_mask_secrets_and_ids_name_the_unmasked_target() {
        let argv: Vec<String> = [
            "cachix",
            "push",
            "--token",
            "npbhq-label-t1",
            "CACHIX_AUTH_TOKEN=x",
            "c",
        ]
        .map(String::from)
        .to_vec();
        let config = Config {
            upload_command: Some(argv),
            ..Config::default()
        };
        let t = configured(&config).remove(0);
        assert_eq!(
            t.label,
            "upload-command: cachix push --token *** CACHIX_AUTH_TOKEN=*** c"
        );
        let line = "upload-command: cachix push --token npbhq-label-t1 CACHIX_AUTH_TOKEN=x c";
        assert_eq!(t.id, TargetId::of(Some(line)));
        let t = Target::url("ssh://u:npbhq-label-pw@h?secret-key=/k");
        assert_eq!(t.label, "ssh://u:***@h?secret-key=***");
        assert_eq!(
            t.id,
            TargetId::of(Some("ssh://u:npbhq-label-pw@h?secret-key=/k"))
        );
        assert_eq!(
            crate::redact::text("npbhq-label-t1 'u:npbhq-label-pw@h'"),
            "*** 'u:***@h'"
        );
    }
}
