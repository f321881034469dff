//! Keeping secrets out of logs, status replies and errors.
//!
//! A store URL may carry a password (`ssh://user:pw@host`, `s3://...`) or a
//! secret in its query (`?secret-key=/path`, `?password=...`); everywhere
//! the daemon shows a URL it shows it through [`url`].

/// Query parameters whose values are masked.
const SECRET_PARAMS: &[&str] = &["secret-key", "password", "token", "access-key", "secret"];

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

#[cfg(test)]
mod tests {
    use super::url;

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
}
