//! Keeping secrets out of logs, status replies, metrics and errors: a
//! URL's password or secret query values (`ssh://u:pw@h`, `?secret-key=`),
//! an uploader's token (`--token T`, `AUTH_TOKEN=T`). Every line shown
//! passes through [`text`]; [`url`] is the narrower form that the journal's
//! target names are made from.

use std::sync::Mutex;

/// Query parameters whose values [`url`] masks.
const SECRET_PARAMS: &[&str] = &["secret-key", "password", "token", "access-key", "secret"];
/// Parts of a key or flag name that mark its value as secret.
const SECRET_NAMES: &[&str] = &["token", "passw", "secret", "key", "auth", "credential"];
/// Where a word holds several `NAME=VALUE` parts.
const PART_ENDS: [char; 4] = ['&', '?', ',', ';'];

/// Text that must never be shown, with its replacement (see [`remember`]);
/// only ever extended, so a poisoned lock still holds good data.
static REMEMBERED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Remembers the secrets of a configured target (a URL, an uploader's
/// command line) for [`text`] to mask where no pattern finds them, such as
/// nix's `cannot connect to 'user:password@host'`.
pub fn remember(target: &str) {
    let mut secrets = Vec::new();
    let rest = target.split_once("://").map_or("", |(_, r)| r);
    let userinfo = rest
        .split(['/', '?'])
        .next()
        .and_then(|a| a.rsplit_once('@'));
    if let Some((user, password)) = userinfo.and_then(|(u, _)| u.split_once(':')) {
        secrets.push((format!("{user}:{password}@"), format!("{user}:***@")));
    }
    let mut prev = "";
    for word in target.split_whitespace() {
        let pairs = word.split(PART_ENDS).filter_map(|p| p.split_once('='));
        let values = pairs.filter(|(name, _)| is_secret(name)).map(|(_, v)| v);
        let after_flag = is_secret_flag(prev).then_some(word);
        secrets.extend(values.chain(after_flag).map(|v| (v.into(), "***".into())));
        prev = word;
    }
    let mut known = REMEMBERED.lock().unwrap_or_else(|e| e.into_inner());
    for pair in secrets {
        if pair.0.len() >= 6 && !known.contains(&pair) {
            known.push(pair);
        }
    }
}

/// The URL with the password of its userinfo and the values of the query
/// parameters in [`SECRET_PARAMS`] replaced by `***`.
pub fn url(url: &str) -> String {
    let (base, query) = url.split_once('?').unzip();
    let base = base.unwrap_or(url);
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            format!("{scheme}://{}{path}", mask_userinfo(authority))
        }
        None => base.to_string(),
    };
    for (i, param) in query.into_iter().flat_map(|q| q.split('&')).enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        match param.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s)) => {
                out.push_str(k);
                out.push_str("=***");
            }
            _ => out.push_str(param),
        }
    }
    out
}

/// Free text with every secret masked, word by word: what [`url`] masks, a
/// bare `user:password@host`, a `NAME=VALUE` whose name looks secret (also
/// between `?&,;`), the word after a flag such as `--token`; and anywhere,
/// what [`remember`] learnt.
pub fn text(text: &str) -> String {
    let is_end = |c: char| c.is_whitespace() || "'\"`<>()".contains(c);
    let (mut out, mut prev) = (String::with_capacity(text.len()), "");
    for piece in text.split_inclusive(is_end) {
        let word = piece.trim_end_matches(is_end);
        if !word.is_empty() {
            out.push_str(&mask_word(prev, word));
            prev = word;
        }
        out.push_str(&piece[word.len()..]);
    }
    for (secret, masked) in REMEMBERED.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        out = out.replace(secret.as_str(), masked);
    }
    out
}

/// One word of free text, masked (see [`text`]).
fn mask_word(prev: &str, word: &str) -> String {
    if is_secret_flag(prev) {
        return "***".into();
    }
    let word = if word.contains("://") {
        url(word)
    } else {
        mask_userinfo(word)
    };
    let parts = word
        .split_inclusive(PART_ENDS)
        .map(|part| match part.split_once('=') {
            Some((name, value)) if is_secret(name) => {
                let end = value.len() - value.trim_end_matches(PART_ENDS).len();
                format!("{name}=***{}", &value[value.len() - end..])
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
    match userinfo.and_then(|(u, host)| Some((u.split_once(':')?.0, host))) {
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
