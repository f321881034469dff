//! Keeping secrets out of logs, status replies and errors.
//!
//! A store URL may carry a password (`ssh://user:pw@host`, `s3://...`) or a
//! secret in its query (`?secret-key=/path`, `?password=...`); everywhere
//! the daemon shows a URL it shows it through [`url`], and every log line,
//! `status` reply and nix error message passes through [`text`], which also
//! finds URLs and `user:password@host` inside free text.

use std::sync::{Mutex, MutexGuard};

/// Query parameters whose values are masked.
const SECRET_PARAMS: &[&str] = &["secret-key", "password", "token", "access-key", "secret"];

/// Text that must never be shown, with its replacement: learnt from the
/// configured target by [`remember`].
static REMEMBERED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn remembered() -> MutexGuard<'static, Vec<(String, String)>> {
    // The list is only ever extended; a poisoned lock still holds good data.
    REMEMBERED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remembers the password of `url`'s userinfo, so that [`mask_remembered`]
/// can hide it where it appears without its scheme: nix says
/// `cannot connect to 'user:password@host'` for an `ssh://` target, which no
/// URL parser recognises.
pub fn remember(url: &str) {
    let base = url.split_once('?').map_or(url, |(b, _)| b);
    let Some((_, rest)) = base.split_once("://") else {
        return;
    };
    let authority = rest.find('/').map_or(rest, |i| &rest[..i]);
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return;
    };
    let Some((user, password)) = userinfo.split_once(':') else {
        return;
    };
    if password.is_empty() {
        return;
    }
    let pair = (format!("{user}:{password}@"), format!("{user}:***@"));
    let mut known = remembered();
    if !known.contains(&pair) {
        known.push(pair);
    }
}

/// `text` with every password learnt by [`remember`] masked.
pub fn mask_remembered(text: &str) -> String {
    let known = remembered();
    let mut out = text.to_string();
    for (secret, masked) in known.iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), masked);
        }
    }
    out
}

/// The URL with the password of its userinfo and secret query values
/// replaced by `***`.
pub fn url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("{userinfo}@{host}"),
                },
                None => authority.to_string(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => base.to_string(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s)) => {
                    format!("{k}=***")
                }
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Masks every secret this module knows of in free text (a log line, a nix
/// error message): URLs' passwords and secret query values, bare
/// `user:password@host`, and the configured target's password.
pub fn text(text: &str) -> String {
    mask_remembered(&scrub(text))
}

/// Masks the password and secret query values ([`url`]) of
/// every URL (a word containing `://`) in free text such as a nix error
/// message, where the configured target appears verbatim, e.g.
/// `unable to download 'http://user:pw@host/nix-cache-info'`; and the
/// password of a bare `user:password@host` (nix's ssh stores print the
/// authority alone: `cannot connect to 'user:pw@host'`).
fn scrub(text: &str) -> String {
    if !text.contains('@') && !text.contains("://") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.contains("://") {
            out.push_str(&url(word));
        } else {
            out.push_str(&mask_userinfo(word));
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_whitespace() || matches!(c, '\'' | '"' | '`' | '<' | '>' | '(' | ')') {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// `user:***@host` for a word `user:password@host`; other words unchanged.
fn mask_userinfo(word: &str) -> String {
    let Some((userinfo, host)) = word.rsplit_once('@') else {
        return word.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) if !host.is_empty() => format!("{user}:***@{host}"),
        _ => word.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{scrub, url};

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
            super::mask_remembered("error: cannot connect to 'npbhq-t:s3cr3t-x@cache.example.com'"),
            "error: cannot connect to 'npbhq-t:***@cache.example.com'"
        );
        assert_eq!(super::mask_remembered("s3cr3t-y"), "s3cr3t-y");
    }

    #[test]
    fn scrub_masks_urls_in_nix_messages() {
        assert_eq!(
            scrub("error: unable to download 'http://npbhq:hunter2@127.0.0.1:1/cache/nix-cache-info': Couldn't connect"),
            "error: unable to download 'http://npbhq:***@127.0.0.1:1/cache/nix-cache-info': Couldn't connect"
        );
        assert_eq!(
            scrub("cannot open connection to remote store \"ssh-ng://u:pw@h?secret-key=/k/sk&x=1\" (exit 1)"),
            "cannot open connection to remote store \"ssh-ng://u:***@h?secret-key=***&x=1\" (exit 1)"
        );
        assert_eq!(
            scrub("to 'https://u:p@[::1]:8443/c' failed"),
            "to 'https://u:***@[::1]:8443/c' failed"
        );
        assert_eq!(
            scrub("error: cannot connect to 'npbhq:hunter2@127.0.0.1'"),
            "error: cannot connect to 'npbhq:***@127.0.0.1'"
        );
        assert_eq!(scrub("user nix@host, at 10:30"), "user nix@host, at 10:30");
        assert_eq!(scrub("file:///c, done"), "file:///c, done");
    }
}
