//! The socket protocol: one request line in, reply lines out (the last `ok` or `err`); a parsed
//! [`Request`] holds only paths safe to journal and hand to `nix`.

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
    /// The queue's state: in lines for people, or (`status json`, true) one JSON object line.
    Status(bool),
    /// Block until everything queued before this request is done.
    Wait,
    /// Make every backing-off path due now.
    Retry,
    /// Requeue paths given up on (`requeue PATH...`; `requeue-failed`: None).
    Requeue(Option<Vec<StorePath>>),
    /// Drop queued paths (`drop PATH...`; `drop-failed`: None, every path given up on).
    Drop(Option<Vec<StorePath>>),
}

/// Every verb with its arguments, for errors.
const VERBS: &str = "enqueue PATH..., drv DRV, ping, status [json], wait, retry, \
    requeue PATH..., requeue-failed, drop PATH..., drop-failed";

/// What a request line of [`MAX_LINE`] bytes or more is told.
pub fn too_long() -> String {
    format!("request line longer than {MAX_LINE} bytes")
}

/// Parses one request line (without its `\n`); the error is sent back after `err `.
pub fn parse_request(line: &[u8], store_dir: &str) -> Result<Request, String> {
    if line.len() >= MAX_LINE {
        return Err(too_long());
    }
    let line = std::str::from_utf8(line).map_err(|_| "request is not valid UTF-8")?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() {
        return Err(format!("empty request; verbs: {VERBS}"));
    }
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let usage = |u: &str| format!("usage: {u}");
    // `ping ` (a trailing space) is an empty argument, refused like any other.
    let plain = |req| (verb.len() == line.len()).then_some(req).ok_or(usage(verb));
    let args: Vec<&str> = rest.split(' ').collect();
    // Space-separated store paths, at most [`MAX_PATHS`].
    let listed = |parse: ParseFn| match args.len() {
        _ if rest.is_empty() && verb == "enqueue" => Err(usage("enqueue PATH [PATH...]")),
        _ if rest.is_empty() => Err(usage(&format!("{verb} PATH [PATH...] (or {verb}-failed)"))),
        n if n > MAX_PATHS => Err(format!(
            "{n} paths in one request; at most {MAX_PATHS} are accepted"
        )),
        _ => (1..)
            .zip(&args)
            .map(|(i, a)| parse(a, store_dir).map_err(|e| format!("path {i}: {e}")))
            .collect(),
    };
    match verb {
        "enqueue" => listed(StorePath::parse_output).map(Request::Enqueue),
        "requeue" => Ok(Request::Requeue(Some(listed(StorePath::parse)?))),
        "drop" => Ok(Request::Drop(Some(listed(StorePath::parse)?))),
        "requeue-failed" => plain(Request::Requeue(None)),
        "drop-failed" => plain(Request::Drop(None)),
        "drv" if !rest.is_empty() && !rest.contains(' ') => StorePath::parse_drv(rest, store_dir)
            .map(Request::Drv)
            .map_err(|e| format!("path 1: {e}")),
        "drv" => Err(usage("drv DRV_PATH")),
        "ping" => plain(Request::Ping),
        "status" if rest == "json" => Ok(Request::Status(true)),
        "status" => plain(Request::Status(false)).map_err(|_| usage("status [json]")),
        "wait" => plain(Request::Wait),
        "retry" => plain(Request::Retry),
        other => Err(format!(
            "unknown verb {:?}; verbs: {VERBS}",
            shorten(other, 40)
        )),
    }
}

type ParseFn = fn(&str, &str) -> Result<StorePath, PathError>;

/// The final reply line: `ok ...` or `err ...`, newline included.
pub fn final_line(result: Result<&str, &str>) -> String {
    let (word, text) = result.map_or_else(|t| ("err", t), |t| ("ok", t));
    let space = if text.is_empty() { "" } else { " " };
    format!("{word}{space}{}\n", one_line(text))
}

/// Replaces line breaks so a message can never split a reply or log line.
pub fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// At most `max` characters of `text`, the rest marked as cut.
pub fn shorten(text: &str, max: usize) -> String {
    let cut = text.char_indices().nth(max);
    cut.map_or_else(|| text.to_string(), |(i, _)| format!("{}...", &text[..i]))
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
        assert_eq!(parse_request(b"status\r", S), Ok(Request::Status(false)));
        assert_eq!(parse_request(b"status json", S), Ok(Request::Status(true)));
        assert_eq!(parse_request(b"wait", S), Ok(Request::Wait));
        assert_eq!(parse_request(b"retry", S), Ok(Request::Retry));
        let p = StorePath::parse(&a, S).unwrap();
        assert_eq!(
            parse_request(format!("requeue {a}").as_bytes(), S),
            Ok(Request::Requeue(Some(vec![p.clone()])))
        );
        assert_eq!(
            parse_request(format!("drop {a} {d}").as_bytes(), S),
            Ok(Request::Drop(Some(vec![
                p,
                StorePath::parse(&d, S).unwrap()
            ])))
        );
        assert_eq!(
            parse_request(b"requeue-failed", S),
            Ok(Request::Requeue(None))
        );
        assert_eq!(parse_request(b"drop-failed", S), Ok(Request::Drop(None)));
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
            Err(format!(
                "{} paths in one request; at most {MAX_PATHS} are accepted",
                MAX_PATHS + 1
            ))
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
