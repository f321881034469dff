//! Store paths checked by Nix's rules, parsed from every socket, spool and
//! journal input before anything else looks at them or a `nix` command line.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

const HASH_LEN: usize = 32;
const MAX_NAME_LEN: usize = 211;

/// A store path that passed every check; clones share the text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath(Arc<str>);

/// Why a string is not a store path: one line that names the broken rule.
pub type PathError = String;

/// A character of Nix's base-32 alphabet: `0-9a-z` without `e o t u`.
fn is_nix_base32(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'd' | b'f'..=b'n' | b'p'..=b's' | b'v'..=b'z')
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b'?' | b'=')
}

fn refused(s: &str, allowed: fn(u8) -> bool) -> Option<char> {
    s.chars().find(|c| !c.is_ascii() || !allowed(*c as u8))
}

/// `s` under `store_dir`, a derivation if `drv` says so; else the broken rule.
fn parse_as(s: &str, store_dir: &str, drv: Option<bool>) -> Result<StorePath, PathError> {
    let rest = s.strip_prefix(store_dir).and_then(|r| r.strip_prefix('/'));
    let r = rest.unwrap_or_default();
    let (hash, name) = r.split_once('-').unwrap_or((r, ""));
    // Byte-wise first: replay parses every journal record.
    let odd = s.bytes().any(|b| !b.is_ascii_graphic());
    let space = || s.chars().find(|c| c.is_control() || c.is_whitespace());
    Err(if s.is_empty() {
        "empty path".into()
    } else if let Some(c) = odd.then(space).flatten() {
        format!("path contains {c:?}: spaces and control characters are not allowed")
    } else if rest.is_none() {
        format!("path is not directly under the store directory {store_dir}/")
    } else if r.contains('/') {
        "path points inside a store object: only <store>/<hash>-<name> is accepted".into()
    } else if hash.len() != HASH_LEN || !r.contains('-') {
        let n = hash.chars().count();
        format!("hash part has {n} characters: it must have {HASH_LEN} nix-base32 characters")
    } else if let Some(c) = refused(hash, is_nix_base32) {
        format!("hash part contains {c:?}: only nix-base32 characters (0-9 a-z without e o t u) are allowed")
    } else if name.is_empty() {
        "path has no name after the hash".into()
    } else if name.len() > MAX_NAME_LEN {
        let n = name.len();
        format!("name has {n} characters: at most {MAX_NAME_LEN} are allowed")
    } else if let Some(c) = refused(name, is_name_byte) {
        format!("name contains {c:?}: only A-Z a-z 0-9 and + - . _ ? = are allowed")
    } else if name.starts_with('.') {
        "name starts with '.', which Nix forbids".into()
    } else if drv == Some(false) && name.ends_with(".drv") {
        "a derivation (.drv) was given where an output path is expected: send it with 'drv'".into()
    } else if drv == Some(true) && !name.ends_with(".drv") {
        "not a derivation: 'drv' takes a path ending in .drv".into()
    } else {
        return Ok(StorePath(Arc::from(s)));
    })
}

impl StorePath {
    /// Parses `s` as a path directly under `store_dir` (e.g. `/nix/store`).
    pub fn parse(s: &str, store_dir: &str) -> Result<StorePath, PathError> {
        parse_as(s, store_dir, None)
    }

    /// Parses an output path: like [`StorePath::parse`], but refuses a `.drv`.
    pub fn parse_output(s: &str, store_dir: &str) -> Result<StorePath, PathError> {
        parse_as(s, store_dir, Some(false))
    }

    /// Parses a derivation path: like [`StorePath::parse`], but requires `.drv`.
    pub fn parse_drv(s: &str, store_dir: &str) -> Result<StorePath, PathError> {
        parse_as(s, store_dir, Some(true))
    }

    /// The full path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for a derivation file, whose outputs must be looked up before upload.
    pub fn is_drv(&self) -> bool {
        self.0.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<Path> for StorePath {
    fn as_ref(&self) -> &Path {
        Path::new(&*self.0)
    }
}

impl AsRef<std::ffi::OsStr> for StorePath {
    fn as_ref(&self) -> &std::ffi::OsStr {
        std::ffi::OsStr::new(&*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "/nix/store";
    const H: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    fn p(name: &str) -> String {
        format!("{S}/{H}-{name}")
    }

    #[test]
    fn accepts_valid_paths() {
        for name in [
            "hello-2.12",
            "a",
            "x+y_z?=1",
            "foo.drv",
            &"n".repeat(MAX_NAME_LEN),
        ] {
            let path = p(name);
            assert_eq!(StorePath::parse(&path, S).unwrap().as_str(), path);
        }
        assert!(StorePath::parse(&p("foo.drv"), S).unwrap().is_drv());
    }

    /// Each input, and the start of the one-line message naming its rule.
    #[test]
    fn rejects_each_rule() {
        let outside = "path is not directly under the store directory /nix/store/";
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "empty path"),
            (p("a b"), "path contains ' ': spaces and control"),
            (p("a\nb"), "path contains '\\n'"),
            (p("a\0b"), "path contains '\\0'"),
            ("--to".into(), outside),
            ("-L".into(), outside),
            ("/tmp/x".into(), outside),
            (format!("{S}x/{H}-a"), outside),
            (
                format!("{S}/{H}-a/bin"),
                "path points inside a store object",
            ),
            (
                format!("{S}/../etc/passwd"),
                "path points inside a store object",
            ),
            (format!("{S}/{H}-a/"), "path points inside a store object"),
            (
                format!("{S}/abc-a"),
                "hash part has 3 characters: it must have 32",
            ),
            (format!("{S}/{H}"), "hash part has 32 characters"),
            (
                format!("{S}/{}e-a", &H[..31]),
                "hash part contains 'e': only nix-base32",
            ),
            (format!("{S}/{}A-a", &H[..31]), "hash part contains 'A'"),
            (format!("{S}/{H}-"), "path has no name after the hash"),
            (
                p(&"n".repeat(MAX_NAME_LEN + 1)),
                "name has 212 characters: at most 211",
            ),
            (p("a/b"), "path points inside a store object"),
            (p("a:b"), "name contains ':': only A-Z"),
            (p("é"), "name contains 'é'"),
            (p(".hidden"), "name starts with '.'"),
            (p(".."), "name starts with '.'"),
        ];
        for (input, want) in cases {
            let said = StorePath::parse(&input, S).unwrap_err().to_string();
            assert!(said.starts_with(want), "input {input:?}: {said}");
            assert!(!said.contains('\n'), "one line: {said:?}");
        }
    }

    #[test]
    fn hash_alphabet_is_exactly_nix_base32() {
        for b in 0u8..=127 {
            let c = b as char;
            let hash = format!("{}{c}", &H[..31]);
            let ok = StorePath::parse(&format!("{S}/{hash}-a"), S).is_ok();
            assert_eq!(ok, H.contains(c), "{c:?}");
        }
    }

    #[test]
    fn drv_and_output_kinds() {
        let said = StorePath::parse_output(&p("x.drv"), S)
            .unwrap_err()
            .to_string();
        assert!(said.starts_with("a derivation (.drv) was given"), "{said}");
        let said = StorePath::parse_drv(&p("x"), S).unwrap_err().to_string();
        assert!(said.starts_with("not a derivation"), "{said}");
        assert!(StorePath::parse_drv(&p("x.drv"), S).is_ok());
        assert!(StorePath::parse_output(&p("x"), S).is_ok());
    }
}
