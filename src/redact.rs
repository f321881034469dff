//! Keeping secrets (`ssh://u:pw@h`, `?secret-key=`, `--token T`, `AUTH_TOKEN=T`) out of
//! what is shown: every line passes through [`text`]; the journal's target names, [`url`].

use std::sync::Mutex;

/// Query parameters [`url`] masks; parts of a name that mark its value secret; part ends.
const SECRET_PARAMS: &[&str] = &["secret-key", "password", "token", "access-key", "secret"];
const SECRET_NAMES: &[&str] = &["token", "passw", "secret", "key", "auth", "credential"];
const PART_ENDS: [char; 4] = ['&', '?', ',', ';'];

/// Secrets to mask, with their masks; only extended (a poisoned lock is fine).
static REMEMBERED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Remembers a configured target's secrets for [`text`] to mask where no pattern finds them.
pub fn remember(target: &str) {
    let rest = target.split_once("://").map_or("", |(_, r)| r);
    let authority = rest.split(['/', '?']).next();
    let userinfo = authority.and_then(|a| a.rsplit_once('@')?.0.split_once(':'));
    let mut secrets: Vec<(String, String)> = (userinfo.into_iter())
        .map(|(user, pw)| (format!("{user}:{pw}@"), format!("{user}:***@")))
        .collect();
    let mut prev = "";
    for word in target.split_whitespace() {
        let pairs = word.split(PART_ENDS).filter_map(|p| p.split_once('='));
        let values = pairs.filter(|(name, _)| is_secret(name)).map(|(_, v)| v);
        let after_flag = is_secret_flag(prev).then_some(word);
        secrets.extend(values.chain(after_flag).map(|v| (v.into(), "***".into())));
        prev = word;
    }
    let mut known = REMEMBERED.lock().unwrap_or_else(|e| e.into_inner());
    secrets.retain(|pair| pair.0.len() >= 6 && !known.contains(pair));
    known.extend(secrets);
}

/// The URL with its userinfo's password and [`SECRET_PARAMS`]' values masked.
pub fn url(url: &str) -> String {
    let masked = match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
            format!("{scheme}://{}{path}", mask_userinfo(authority))
        }
        None => url.to_string(),
    };
    let secret = |k: &str| SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s));
    mask_pairs(&masked, &['?', '&'], secret)
}

/// Free text with every secret masked: in each word what [`url`] masks,
/// `user:password@host`, a `NAME=VALUE` whose name looks secret, the word
/// after a flag such as `--token`; anywhere, what [`remember`] learnt.
pub fn text(text: &str) -> String {
    let is_end = |c: char| c.is_whitespace() || "'\"`<>()".contains(c);
    let (mut out, mut prev) = (String::with_capacity(text.len()), "");
    for piece in text.split_inclusive(is_end) {
        let word = piece.trim_end_matches(is_end);
        let masked = match word.contains("://") {
            _ if is_secret_flag(prev) && !word.is_empty() => "***".into(),
            true => url(word),
            false => mask_userinfo(word),
        };
        out.push_str(&mask_pairs(&masked, &PART_ENDS, is_secret));
        out.push_str(&piece[word.len()..]);
        prev = if word.is_empty() { prev } else { word };
    }
    for (secret, masked) in REMEMBERED.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        out = out.replace(secret.as_str(), masked);
    }
    out
}

/// `word` with the value of each `NAME=VALUE` part (ended by `ends`) named `secret` masked.
fn mask_pairs(word: &str, ends: &[char], secret: impl Fn(&str) -> bool) -> String {
    let parts = word
        .split_inclusive(ends)
        .map(|part| match part.split_once('=') {
            Some((name, value)) if secret(name) => {
                let kept = value.trim_end_matches(ends);
                format!("{name}=***{}", &value[kept.len()..])
            }
            _ => part.to_string(),
        });
    parts.collect()
}

/// True for a key or flag name that marks a secret value.
fn is_secret(name: &str) -> bool {
    let name = name.trim_start_matches('-').to_ascii_lowercase();
    SECRET_NAMES.iter().any(|s| name.contains(s))
}

/// True for a flag whose next argument is a secret (`--token T`, `-t T`).
fn is_secret_flag(word: &str) -> bool {
    word == "-t" || (word.starts_with("--") && !word.contains('=') && is_secret(word))
}

/// `user:***@host` for a word `user:password@host`; other words unchanged.
fn mask_userinfo(word: &str) -> String {
    let userinfo = word.rsplit_once('@');
    match userinfo.and_then(|(u, h)| Some((u.split_once(':')?.0, h))) {
        Some((user, host)) => format!("{user}:***@{host}"),
        None => word.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{text, url};

    #[test]
    fn masks_passwords_and_secret_params() {
        assert_eq!(
            url("ssh://nix@cache.example.com"),
            "ssh://nix@cache.example.com"
        );
        assert_eq!(url("https://u:hunter2@h/p?x=1"), "https://u:***@h/p?x=1");
        assert_eq!(
            url("file:///c?compression=none&secret-key=/k"),
            "file:///c?compression=none&secret-key=***"
        );
        assert_eq!(
            url("s3://b?profile=p&Password=x"),
            "s3://b?profile=p&Password=***"
        );
        assert_eq!(url("local"), "local");
    }

    #[test]
    fn remembered_passwords_are_masked_without_a_scheme() {
        super::remember("ssh://npbhq-t:s3cr3t-x@cache.example.com?secret-key=/k");
        super::remember("file:///no/password");
        assert_eq!(
            text("error: cannot connect to 'npbhq-t:s3cr3t-x@cache.example.com'"),
            "error: cannot connect to 'npbhq-t:***@cache.example.com'"
        );
        assert_eq!(text("s3cr3t-y"), "s3cr3t-y");
        super::remember("upload-command: cachix push --token tok-npbhq-1 X_AUTH=tok-npbhq-2 c");
        assert_eq!(
            text("error: tok-npbhq-1 refused; tok-npbhq-2 too"),
            "error: *** refused; *** too"
        );
    }

    #[test]
    fn scrub_masks_urls_in_nix_messages() {
        assert_eq!(
            text("error: unable to download 'http://npbhq:hunter2@127.0.0.1:1/cache/nix-cache-info': Couldn't connect"),
            "error: unable to download 'http://npbhq:***@127.0.0.1:1/cache/nix-cache-info': Couldn't connect"
        );
        assert_eq!(
            text("cannot open connection to remote store \"ssh-ng://u:pw@h?secret-key=/k/sk&x=1\" (exit 1)"),
            "cannot open connection to remote store \"ssh-ng://u:***@h?secret-key=***&x=1\" (exit 1)"
        );
        assert_eq!(
            text("to 'https://u:p@[::1]:8443/c' failed"),
            "to 'https://u:***@[::1]:8443/c' failed"
        );
        assert_eq!(
            text("error: cannot connect to 'npbhq:hunter2@127.0.0.1'"),
            "error: cannot connect to 'npbhq:***@127.0.0.1'"
        );
        assert_eq!(text("user nix@host, at 10:30"), "user nix@host, at 10:30");
        assert_eq!(text("file:///c, done"), "file:///c, done");
    }

    #[test]
    fn secret_arguments_and_pairs_are_masked_wherever_they_are() {
        assert_eq!(
            text("upload-command: cachix push --token T1 -t T2 --auth-token=T3 --secret T4 c"),
            "upload-command: cachix push --token *** -t *** --auth-token=*** --secret *** c"
        );
        assert_eq!(
            text("env CACHIX_AUTH_TOKEN=T5 AWS_SECRET_ACCESS_KEY=T6 PASSWORD=T7 LEVEL=3 up"),
            "env CACHIX_AUTH_TOKEN=*** AWS_SECRET_ACCESS_KEY=*** PASSWORD=*** LEVEL=3 up"
        );
        // A URL cut in two by a space: its query still masked.
        assert_eq!(
            text("error: don't know how to open Nix store 'fiel:///c?x=1 &Token=abc&y=2'"),
            "error: don't know how to open Nix store 'fiel:///c?x=1 &Token=***&y=2'"
        );
        assert_eq!(
            text("'s3://b ?profile=p,Secret=x;z'"),
            "'s3://b ?profile=p,Secret=***;z'"
        );
        assert_eq!(text("--keep-going -j 4 key"), "--keep-going -j 4 key");
        // The journal's form of a URL masks only what it always masked.
        assert_eq!(
            url("file:///c?mytoken=x&Token=y"),
            "file:///c?mytoken=x&Token=***"
        );
    }
}
