//! Validated Nix store paths.
//!
//! Every path that arrives over the socket, from the spool or from the journal
//! is parsed into a [`StorePath`] before anything else looks at it, so that
//! nothing unchecked can reach a `nix` command line or the journal. The rules
//! are Nix's own: `<store-dir>/<32 nix-base32 chars>-<name>`, where the name is
//! 1 to 211 characters from `A-Za-z0-9+-._?=` and does not start with `.`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Length of the hash part of a store path's base name.
pub const HASH_LEN: usize = 32;
/// Longest name Nix accepts after the hash and dash.
pub const MAX_NAME_LEN: usize = 211;

/// A store path that passed every check: safe to journal and to pass to `nix`.
/// Clones share the text, so the journal and the worker's queues can each
/// hold the same path cheaply.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath(Arc<str>);

/// Why a string is not a store path; each message names the broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// The string was empty.
    Empty,
    /// The string contains a control character (newline, NUL, ...) or a space.
    BadByte(char),
    /// The string does not start with the store directory.
    OutsideStore(String),
    /// There is more than one component after the store directory.
    Subpath,
    /// The hash part is not 32 characters long.
    HashLength(usize),
    /// The hash part has a character outside nix-base32.
    HashChar(char),
    /// Nothing follows the hash and dash.
    EmptyName,
    /// The name is longer than Nix allows.
    NameTooLong(usize),
    /// The name has a character Nix forbids.
    NameChar(char),
    /// The name starts with a dot.
    NameDot,
    /// A derivation (`.drv`) was given where an output path was expected.
    DrvNotAllowed,
    /// An output path was given where a derivation was expected.
    NotDrv,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::Empty => write!(f, "empty path"),
            PathError::BadByte(c) => write!(
                f,
                "path contains {:?}: spaces and control characters are not allowed",
                c
            ),
            PathError::OutsideStore(dir) => {
                write!(f, "path is not directly under the store directory {dir}/")
            }
            PathError::Subpath => write!(
                f,
                "path points inside a store object: only <store>/<hash>-<name> is accepted"
            ),
            PathError::HashLength(n) => write!(
                f,
                "hash part has {n} characters: it must have {HASH_LEN} nix-base32 characters"
            ),
            PathError::HashChar(c) => write!(
                f,
                "hash part contains {c:?}: only nix-base32 characters (0-9 a-z without e o t u) are allowed"
            ),
            PathError::EmptyName => write!(f, "path has no name after the hash"),
            PathError::NameTooLong(n) => write!(
                f,
                "name has {n} characters: at most {MAX_NAME_LEN} are allowed"
            ),
            PathError::NameChar(c) => write!(
                f,
                "name contains {c:?}: only A-Z a-z 0-9 and + - . _ ? = are allowed"
            ),
            PathError::NameDot => write!(f, "name starts with '.', which Nix forbids"),
            PathError::DrvNotAllowed => write!(
                f,
                "a derivation (.drv) was given where an output path is expected: send it with 'drv'"
            ),
            PathError::NotDrv => write!(f, "not a derivation: 'drv' takes a path ending in .drv"),
        }
    }
}

impl std::error::Error for PathError {}

/// A character of Nix's base-32 alphabet: `0-9a-z` without `e o t u`.
fn is_nix_base32(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'd' | b'f'..=b'n' | b'p'..=b's' | b'v'..=b'z')
}

/// A character Nix allows in a store path's name.
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b'?' | b'=')
}

/// The first character of `s` that is not an allowed ASCII byte, for the
/// error message (the byte-wise check already found one).
fn first_char_not(s: &str, allowed: fn(u8) -> bool) -> char {
    s.chars()
        .find(|c| !c.is_ascii() || !allowed(*c as u8))
        .unwrap_or('\u{fffd}')
}

impl StorePath {
    /// Parses `s` as a path directly under `store_dir` (given without a trailing
    /// slash, e.g. `/nix/store`).
    pub fn parse(s: &str, store_dir: &str) -> Result<StorePath, PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        // Byte-wise first (replay parses every journal record); only a
        // non-ASCII or unprintable byte needs the look at characters.
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            if let Some(c) = s.chars().find(|c| c.is_control() || c.is_whitespace()) {
                return Err(PathError::BadByte(c));
            }
        }
        let rest = s
            .strip_prefix(store_dir)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| PathError::OutsideStore(store_dir.to_string()))?;
        if rest.contains('/') {
            return Err(PathError::Subpath);
        }
        let (hash, name) = match rest.split_once('-') {
            Some(parts) => parts,
            None => return Err(PathError::HashLength(rest.len())),
        };
        if hash.len() != HASH_LEN {
            return Err(PathError::HashLength(hash.chars().count()));
        }
        if !hash.bytes().all(is_nix_base32) {
            return Err(PathError::HashChar(first_char_not(hash, is_nix_base32)));
        }
        if name.is_empty() {
            return Err(PathError::EmptyName);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(PathError::NameTooLong(name.len()));
        }
        if !name.bytes().all(is_name_byte) {
            return Err(PathError::NameChar(first_char_not(name, is_name_byte)));
        }
        if name.starts_with('.') {
            return Err(PathError::NameDot);
        }
        Ok(StorePath(Arc::from(s)))
    }

    /// Parses an output path: like [`StorePath::parse`], but refuses a `.drv`.
    pub fn parse_output(s: &str, store_dir: &str) -> Result<StorePath, PathError> {
        let p = StorePath::parse(s, store_dir)?;
        if p.is_drv() {
            return Err(PathError::DrvNotAllowed);
        }
        Ok(p)
    }

    /// Parses a derivation path: like [`StorePath::parse`], but requires `.drv`.
    pub fn parse_drv(s: &str, store_dir: &str) -> Result<StorePath, PathError> {
        let p = StorePath::parse(s, store_dir)?;
        if !p.is_drv() {
            return Err(PathError::NotDrv);
        }
        Ok(p)
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

    #[test]
    fn rejects_each_rule() {
        let cases: Vec<(String, PathError)> = vec![
            (String::new(), PathError::Empty),
            (p("a b"), PathError::BadByte(' ')),
            (p("a\nb"), PathError::BadByte('\n')),
            (p("a\0b"), PathError::BadByte('\0')),
            ("--to".into(), PathError::OutsideStore(S.into())),
            ("-L".into(), PathError::OutsideStore(S.into())),
            ("/tmp/x".into(), PathError::OutsideStore(S.into())),
            (format!("{S}x/{H}-a"), PathError::OutsideStore(S.into())),
            (format!("{S}/{H}-a/bin"), PathError::Subpath),
            (format!("{S}/../etc/passwd"), PathError::Subpath),
            (format!("{S}/{H}-a/"), PathError::Subpath),
            (format!("{S}/abc-a"), PathError::HashLength(3)),
            (format!("{S}/{H}"), PathError::HashLength(32)),
            (format!("{S}/{}e-a", &H[..31]), PathError::HashChar('e')),
            (format!("{S}/{}A-a", &H[..31]), PathError::HashChar('A')),
            (format!("{S}/{H}-"), PathError::EmptyName),
            (
                p(&"n".repeat(MAX_NAME_LEN + 1)),
                PathError::NameTooLong(212),
            ),
            (p("a/b"), PathError::Subpath),
            (p("a:b"), PathError::NameChar(':')),
            (p("é"), PathError::NameChar('é')),
            (p(".hidden"), PathError::NameDot),
            (p(".."), PathError::NameDot),
        ];
        for (input, want) in cases {
            assert_eq!(StorePath::parse(&input, S), Err(want), "input {input:?}");
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
        assert_eq!(
            StorePath::parse_output(&p("x.drv"), S),
            Err(PathError::DrvNotAllowed)
        );
        assert_eq!(StorePath::parse_drv(&p("x"), S), Err(PathError::NotDrv));
        assert!(StorePath::parse_drv(&p("x.drv"), S).is_ok());
        assert!(StorePath::parse_output(&p("x"), S).is_ok());
    }

    #[test]
    fn every_message_is_one_line() {
        let errs = [
            PathError::Empty,
            PathError::BadByte('\n'),
            PathError::OutsideStore(S.into()),
            PathError::Subpath,
            PathError::HashLength(3),
            PathError::HashChar('e'),
            PathError::EmptyName,
            PathError::NameTooLong(300),
            PathError::NameChar(':'),
            PathError::NameDot,
            PathError::DrvNotAllowed,
            PathError::NotDrv,
        ];
        for e in errs {
            assert!(!e.to_string().contains('\n'), "{e:?}");
        }
    }
}
