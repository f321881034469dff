//! The socket protocol: one request line in, reply lines out.
//!
//! A request is `VERB [ARG...]` terminated by `\n`, in UTF-8, arguments
//! separated by single spaces. Every reply ends with a final line starting
//! with `ok` or `err`; `status` and `wait` send informational lines before it.
//! Parsing validates every path, so a [`Request`] only ever holds paths that
//! are safe to journal and to hand to `nix`.

use std::fmt;

use crate::store_path::{PathError, StorePath};

pub use crate::wire::{ERR_BUSY, ERR_JOURNAL, ERR_STOPPING, ERR_WORKER_GONE, MAX_LINE, MAX_PATHS};

/// A parsed, validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Queue these output paths.
    Enqueue(Vec<StorePath>),
    /// Queue the outputs of this derivation (the daemon looks them up).
    Drv(StorePath),
    /// Liveness check; the reply carries the daemon's version.
    Ping,
    /// Report the queue's state: `status` in lines for people, `status
    /// json` in one JSON object line.
    Status {
        /// `status json`.
        json: bool,
    },
    /// Block until everything queued before this request is done.
    Wait,
    /// Make every backing-off path due now.
    Retry,
    /// Requeue paths given up on (`requeue PATH...`, `requeue-failed`).
    Requeue(Selection),
    /// Drop queued paths from the journal (`drop PATH...`, `drop-failed`).
    Drop(Selection),
}

/// The paths an admin request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These paths.
    Paths(Vec<StorePath>),
    /// Every path given up on.
    AllFailed,
}

/// Every verb with its arguments, for errors.
const VERBS: &str = "enqueue PATH..., drv DRV, ping, status [json], wait, retry, requeue PATH..., requeue-failed, drop PATH..., drop-failed";

/// Why a request line was refused; the text is sent back after `err `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The line is longer than [`MAX_LINE`]: the connection ends.
    TooLong,
    /// Anything else wrong with it, said in full.
    Bad(String),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::TooLong => write!(f, "request line longer than {MAX_LINE} bytes"),
            ProtocolError::Bad(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Parses one request line (without its `\n`) against the store directory.
pub fn parse_request(line: &[u8], store_dir: &str) -> Result<Request, ProtocolError> {
    if line.len() >= MAX_LINE {
        return Err(ProtocolError::TooLong);
    }
    let bad = ProtocolError::Bad;
    let line = std::str::from_utf8(line).map_err(|_| bad("request is not valid UTF-8".into()))?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() {
        return Err(bad(format!("empty request; verbs: {VERBS}")));
    }
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let usage = |u: &str| bad(format!("usage: {u}"));
    // `ping ` (a trailing space) is an empty argument, refused like any other.
    let plain = |req| (verb.len() == line.len()).then_some(req).ok_or(usage(verb));
    let listed = |u: &str, parse: ParseFn| match rest {
        "" => Err(usage(u)),
        _ => paths(rest, store_dir, parse),
    };
    match verb {
        "enqueue" => {
            listed("enqueue PATH [PATH...]", StorePath::parse_output).map(Request::Enqueue)
        }
        "requeue" => listed(
            "requeue PATH [PATH...] (or requeue-failed)",
            StorePath::parse,
        )
        .map(|p| Request::Requeue(Selection::Paths(p))),
        "drop" => listed("drop PATH [PATH...] (or drop-failed)", StorePath::parse)
            .map(|p| Request::Drop(Selection::Paths(p))),
        "requeue-failed" => plain(Request::Requeue(Selection::AllFailed)),
        "drop-failed" => plain(Request::Drop(Selection::AllFailed)),
        "drv" if !rest.is_empty() && !rest.contains(' ') => StorePath::parse_drv(rest, store_dir)
            .map(Request::Drv)
            .map_err(|e| bad(format!("path 1: {e}"))),
        "drv" => Err(usage("drv DRV_PATH")),
        "ping" => plain(Request::Ping),
        "status" if rest == "json" => Ok(Request::Status { json: true }),
        "status" => plain(Request::Status { json: false }).map_err(|_| usage("status [json]")),
        "wait" => plain(Request::Wait),
        "retry" => plain(Request::Retry),
        other => Err(bad(format!(
            "unknown verb {:?}; verbs: {VERBS}",
            truncate(other, 40)
        ))),
    }
}

type ParseFn = fn(&str, &str) -> Result<StorePath, PathError>;

/// Parses space-separated store paths, at most [`MAX_PATHS`] of them.
fn paths(rest: &str, store_dir: &str, parse: ParseFn) -> Result<Vec<StorePath>, ProtocolError> {
    let args: Vec<&str> = rest.split(' ').collect();
    if args.len() > MAX_PATHS {
        let n = args.len();
        let why = format!("{n} paths in one request; at most {MAX_PATHS} are accepted");
        return Err(ProtocolError::Bad(why));
    }
    let parsed = args.iter().enumerate().map(|(i, a)| {
        parse(a, store_dir).map_err(|e| ProtocolError::Bad(format!("path {}: {e}", i + 1)))
    });
    parsed.collect()
}

/// The final reply line: `ok ...` or `err ...`, newline included.
pub fn final_line(result: Result<&str, &str>) -> String {
    let (word, text) = match result {
        Ok(t) => ("ok", t),
        Err(t) => ("err", t),
    };
    let text = one_line(text);
    if text.is_empty() {
        format!("{word}\n")
    } else {
        format!("{word} {text}\n")
    }
}

/// Replaces line breaks so a message can never split a reply or log line.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::request_line;

    const S: &str = "/nix/store";
    const H: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    #[test]
    fn parses_each_verb() {
        let a = format!("{S}/{H}-a");
        let b = format!("{S}/{H}-b");
        let d = format!("{S}/{H}-a.drv");
        assert_eq!(
            parse_request(format!("enqueue {a} {b}").as_bytes(), S),
            Ok(Request::Enqueue(vec![
                StorePath::parse(&a, S).unwrap(),
                StorePath::parse(&b, S).unwrap()
            ]))
        );
        assert_eq!(
            parse_request(format!("drv {d}").as_bytes(), S),
            Ok(Request::Drv(StorePath::parse(&d, S).unwrap()))
        );
        assert_eq!(parse_request(b"ping", S), Ok(Request::Ping));
        assert_eq!(
            parse_request(b"status\r", S),
            Ok(Request::Status { json: false })
        );
        assert_eq!(
            parse_request(b"status json", S),
            Ok(Request::Status { json: true })
        );
        assert_eq!(parse_request(b"wait", S), Ok(Request::Wait));
        assert_eq!(parse_request(b"retry", S), Ok(Request::Retry));
        let p = StorePath::parse(&a, S).unwrap();
        assert_eq!(
            parse_request(format!("requeue {a}").as_bytes(), S),
            Ok(Request::Requeue(Selection::Paths(vec![p.clone()])))
        );
        assert_eq!(
            parse_request(format!("drop {a} {d}").as_bytes(), S),
            Ok(Request::Drop(Selection::Paths(vec![
                p,
                StorePath::parse(&d, S).unwrap()
            ])))
        );
        assert_eq!(
            parse_request(b"requeue-failed", S),
            Ok(Request::Requeue(Selection::AllFailed))
        );
        assert_eq!(
            parse_request(b"drop-failed", S),
            Ok(Request::Drop(Selection::AllFailed))
        );
    }

    #[test]
    fn refuses_malformed_requests() {
        let good = format!("{S}/{H}-a");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "empty request"),
            (b"\xff\xfe".to_vec(), "UTF-8"),
            (b"frobnicate".to_vec(), "unknown verb"),
            (b"enqueue".to_vec(), "usage"),
            (b"ping now".to_vec(), "usage"),
            (b"ping ".to_vec(), "usage"),
            (b"status ".to_vec(), "usage"),
            (
                format!("enqueue {good}  {good}").into_bytes(),
                "path 2: empty path",
            ),
            (format!("enqueue {good} --to").into_bytes(), "path 2"),
            (format!("enqueue {S}/{H}-a.drv").into_bytes(), "derivation"),
            (format!("drv {good}").into_bytes(), "not a derivation"),
            (format!("drv {good}.drv {good}.drv").into_bytes(), "usage"),
            (b"drop".to_vec(), "usage: drop PATH"),
            (b"requeue".to_vec(), "usage: requeue PATH"),
            (b"drop-failed x".to_vec(), "usage"),
            (format!("drop {good} /etc/passwd").into_bytes(), "path 2"),
            (vec![b'x'; MAX_LINE], "longer than"),
        ];
        for (line, want) in cases {
            let err = parse_request(&line, S).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(&line[..line.len().min(60)])
            );
            assert!(!err.contains('\n'));
        }
        let many = format!("enqueue{}", format!(" {good}").repeat(MAX_PATHS + 1));
        assert_eq!(
            parse_request(many.as_bytes(), S),
            Err(ProtocolError::Bad(format!(
                "{} paths in one request; at most {MAX_PATHS} are accepted",
                MAX_PATHS + 1
            )))
        );
    }

    #[test]
    fn reply_lines_are_single_lines() {
        assert_eq!(final_line(Ok("3")), "ok 3\n");
        assert_eq!(final_line(Err("a\nb")), "err a b\n");
        assert_eq!(final_line(Ok("")), "ok\n");
        assert_eq!(request_line("enqueue", &["x", "y"]), "enqueue x y\n");
        let smuggled = request_line("enqueue", &[&format!("{S}/{H}-a\nretry"), "b\r"]);
        assert_eq!(smuggled.matches('\n').count(), 1, "{smuggled:?}");
        assert!(parse_request(smuggled.trim_end_matches('\n').as_bytes(), S).is_err());
    }
}
