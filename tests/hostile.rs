//! Hostile input, load and access: the daemon stays up, rejects clearly and
//! lets no one in: a protocol fuzz checked against [`model`] (an independent
//! reading of the README's rules), load, access by real users (root only),
//! injection, secrets and limits. Timeouts are correctness bounds, never
//! speed assertions.

mod common;

use common::*;
use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// Longest request line, newline included, and most paths per request (README).
const MAX_LINE: usize = 1 << 20;
const MAX_PATHS: usize = 10_000;
/// Nix's base-32 alphabet, the characters of a store path name, its longest length.
const NIX_BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
const NAME_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-._?=";
const MAX_NAME: usize = 211;
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// xorshift64* (Vigna), seeded through splitmix64: std-only, reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }

    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// `len` random bytes, with `nl` instead of a newline.
    fn bytes(&mut self, len: usize, nl: u8) -> Vec<u8> {
        let b = |b: u8| if b == b'\n' { nl } else { b };
        (0..len).map(|_| b(self.below(256) as u8)).collect()
    }
}

fn gen_chars(rng: &mut Rng, alphabet: &[u8], len: usize) -> String {
    (0..len).map(|_| *rng.pick(alphabet) as char).collect()
}

/// A 32-character nix-base32 hash unique to `i` (and `salt`).
fn index_hash(salt: u64, i: usize) -> String {
    let mut rng = Rng::new(salt.wrapping_mul(0x1000_0000_01b3) ^ i as u64);
    let mut h = gen_chars(&mut rng, NIX_BASE32, 24);
    h.extend((0..8).map(|k| NIX_BASE32[(i >> (5 * k)) % 32] as char));
    h
}

/// A valid output name (never `.drv`, never starting with `.`).
fn gen_name(rng: &mut Rng) -> String {
    let len = rng.range(1, 24);
    let len = if rng.below(100) < 3 { MAX_NAME } else { len };
    let mut s = gen_chars(rng, NAME_CHARS, len);
    if s.starts_with('.') {
        s.replace_range(0..1, "x");
    }
    if s.ends_with(".drv") {
        s.replace_range(len - 1.., "x");
    }
    s
}

/// A valid store path ending in `ext` (`""` for an output, `".drv"`).
fn gen_path(rng: &mut Rng, store: &str, ext: &str) -> String {
    let h = gen_chars(rng, NIX_BASE32, 32);
    let mut name = gen_name(rng);
    name.truncate(MAX_NAME - ext.len());
    format!("{store}/{h}-{name}{ext}")
}

/// Every store-path rule `p` breaks, as the fragment of the daemon's message
/// for it (README, Protocol); empty for a valid output path (`drv`: a valid
/// derivation). The daemon may report any one of them.
fn path_rules(p: &str, store: &str, drv: bool) -> Vec<&'static str> {
    if p.is_empty() {
        return vec!["empty path"];
    }
    let base = p.strip_prefix(store).and_then(|r| r.strip_prefix('/'));
    let flat = base.filter(|b| !b.contains('/'));
    let split = flat.is_some_and(|b| b.contains('-'));
    let (hash, name) = flat.and_then(|b| b.split_once('-')).unwrap_or_default();
    let hash_len = flat.is_some() && (!split || hash.len() != 32 || hash.chars().count() != 32);
    let outside = |s: &str, set: &[u8]| s.bytes().any(|c| !set.contains(&c));
    let blank = p.chars().any(|c| c.is_control() || c.is_whitespace());
    let rules = [
        (blank, "spaces and control characters are not allowed"),
        (base.is_none(), "not directly under the store directory"),
        (base.is_some() && flat.is_none(), "inside a store object"),
        (hash_len, "hash part has"),
        (outside(hash, NIX_BASE32), "hash part contains"),
        (split && name.is_empty(), "no name after the hash"),
        (name.len() > MAX_NAME, "at most 211"),
        (outside(name, NAME_CHARS), "name contains"),
        (name.starts_with('.'), "starts with '.'"),
    ];
    let mut broken: Vec<&str> = rules.iter().filter(|r| r.0).map(|r| r.1).collect();
    let kind = [
        "derivation (.drv) was given where an output path is expected",
        "not a derivation",
    ];
    if broken.is_empty() && p.ends_with(".drv") != drv {
        broken.push(kind[usize::from(drv)]);
    }
    broken
}

/// What the daemon must answer to one request line (without its `\n`).
#[derive(Debug)]
enum Expect {
    /// `ok N`, N of these (distinct) paths newly queued.
    Queue(Vec<String>),
    /// `ok nix-post-build-hook-queue VERSION`.
    Ping,
    /// Another valid verb (`status`, `wait`, `retry`): a final `ok`.
    OtherOk,
    /// One `err` line holding both fragments of at least one alternative.
    Err(Vec<(String, &'static str)>),
}

fn err1(fragment: &'static str) -> Expect {
    Expect::Err(vec![(String::new(), fragment)])
}

/// The protocol as the README states it, written independently of
/// `src/protocol.rs`: the oracle of the fuzz test.
fn model(line: &[u8], store: &str) -> Expect {
    if line.len() + 1 > MAX_LINE {
        return err1("longer than 1048576 bytes");
    }
    let Ok(text) = std::str::from_utf8(line) else {
        return err1("not valid UTF-8");
    };
    let text = text.strip_suffix('\r').unwrap_or(text);
    let (verb, rest) = text
        .split_once(' ')
        .map_or((text, None), |(v, r)| (v, Some(r)));
    let queue = |paths: Vec<&str>, drv: bool| {
        let mut alts = Vec::new();
        let rules = paths.iter().map(|p| path_rules(p, store, drv));
        if let Some((i, rules)) = rules.enumerate().find(|(_, r)| !r.is_empty()) {
            alts.extend(rules.into_iter().map(|r| (format!("path {}: ", i + 1), r)));
        }
        let n = paths.len();
        if n > MAX_PATHS {
            alts.push((format!("{n} paths in one request; at most {MAX_PATHS}"), ""));
        }
        if alts.is_empty() {
            Expect::Queue(paths.into_iter().map(String::from).collect())
        } else {
            Expect::Err(alts)
        }
    };
    match (verb, rest) {
        ("", None) => err1("empty request"),
        ("ping", None) => Expect::Ping,
        ("status" | "wait" | "retry", None) => Expect::OtherOk,
        ("ping" | "status" | "wait" | "retry", Some(_)) => err1("usage: "),
        ("enqueue", None | Some("")) => err1("usage: enqueue PATH"),
        ("enqueue", Some(r)) => queue(r.split(' ').collect(), false),
        ("drv", Some(r)) if !r.is_empty() && !r.contains(' ') => queue(vec![r], true),
        ("drv", _) => err1("usage: drv DRV_PATH"),
        _ => err1("unknown verb"),
    }
}

/// Checks one reply (its lines, the final one last) against the model;
/// returns N for an `ok N` to a queue request.
fn check_reply(expect: &Expect, reply: &[String]) -> Result<usize, String> {
    let last = reply.last().ok_or("no reply")?;
    let n = match expect {
        Expect::OtherOk => (last == "ok" || last.starts_with("ok ")).then_some(0),
        _ if reply.len() != 1 => None,
        Expect::Ping => Some(0).filter(|_| last.starts_with("ok nix-post-build-hook-queue ")),
        Expect::Queue(paths) => (last.strip_prefix("ok ").and_then(|n| n.parse().ok()))
            .filter(|&n| n <= paths.iter().collect::<HashSet<_>>().len()),
        Expect::Err(alts) => {
            let named = alts
                .iter()
                .any(|(a, b)| last.contains(a.as_str()) && last.contains(b));
            let short = last.starts_with("err ") && !last.contains('\r') && last.len() <= 600;
            (short && named).then_some(0)
        }
    };
    n.ok_or_else(|| format!("expected {expect:?}, got {reply:?}"))
}

/// Reads reply lines until the daemon closes the connection (a reset, our
/// data left unread, is a close too); panics on a read timeout (the daemon
/// must answer or close).
fn read_until_closed(stream: UnixStream, what: &str) -> Vec<String> {
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let mut r = BufReader::new(stream);
    let mut lines = Vec::new();
    loop {
        let mut buf = Vec::new();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => return lines,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return lines,
            Err(e) => panic!("{what}: reading replies: {e}; got so far {lines:?}"),
            Ok(_) => {
                assert_eq!(buf.pop(), Some(b'\n'), "{what}: no newline after {lines:?}");
                lines.push(String::from_utf8_lossy(&buf).into_owned());
            }
        }
    }
}

/// Connects, writes `data` from a second thread (write errors after the
/// daemon closed are expected and ignored), shuts down the write side, and
/// returns every reply line until the daemon closes.
fn exchange(socket: &Path, data: Vec<u8>, what: &str) -> Vec<String> {
    let stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("{what}: connect {}: {e}", socket.display()));
    stream.set_write_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().expect("try_clone");
    let w = thread::spawn(move || {
        let _ = writer.write_all(&data);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let out = read_until_closed(stream, what);
    w.join().expect("writer thread");
    out
}

/// Sends `line` on a held connection and reads the one reply line.
fn send(mut s: &UnixStream, line: &str) -> std::io::Result<String> {
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut l = String::new();
    BufReader::new(s).read_line(&mut l)?;
    Ok(l.trim_end_matches('\n').to_string())
}

/// A daemon whose queue never drains (see [`FakeNix::hang`]).
fn hanging_daemon(env: &NixEnv) -> (Daemon, FakeNix) {
    let w = FakeNix::hang(env);
    let config = [
        ("upload-to", "file:///dev/null/npbhq-never"),
        ("nix", &w.nix()),
        ("retry-initial-delay", "3600"),
        ("retry-max-delay", "3600"),
        ("command-timeout", "900"),
    ];
    (Daemon::start(env, &config), w)
}

fn assert_alive(d: &mut Daemon, ctx: &str) {
    assert!(d.is_running(), "{ctx}: the daemon exited");
    let pong = ask(&d.socket(), "ping");
    let pong_ok = pong.starts_with("ok nix-post-build-hook-queue ");
    assert!(pong_ok, "{ctx}: ping answered {pong:?}");
    let log = d.log();
    assert!(!log.contains("panicked"), "{ctx}: a panic; log:\n{log}");
}

/// The fixed seed, or `NPBHQ_FUZZ_SEED` to replay another.
fn fuzz_seed() -> u64 {
    std::env::var("NPBHQ_FUZZ_SEED").map_or(0x5eed_0005_6e9f_2024, |s| s.parse().unwrap())
}

/// A path aimed at the edges of the rules: mostly invalid, but the model
/// decides (one valid by chance must be accepted).
fn gen_edge_path(rng: &mut Rng, store: &str) -> String {
    let (h, n) = (gen_chars(rng, NIX_BASE32, 32), gen_name(rng));
    let mut odd: Vec<&str> = "/tmp/x / relative/path - -- -L --to --store=/x --recursive -rf \
        `id` ;id |id &&id .. . ~root"
        .split(' ')
        .collect();
    odd.extend(["", "$(touch /tmp/npbhq-pwned)"]);
    let chars = "/:$`;|&*~!@#%^()[]{}<>,'\"\\é\u{7f}\t\r\0 \u{a0}\u{2028}\u{1b}\u{85}💥";
    let c = rng.pick(&chars.chars().collect::<Vec<_>>()).to_string();
    let at = rng.below(n.len() + 1);
    let len = *rng.pick(&[0, 1, 31, 33, 52]);
    let at_h = rng.below(32);
    let wrong = rng.pick(&["e", "o", "t", "u", "A", "Z", "_", ".", "+", "é", "="]);
    // {o} an odd word, {s} the store, {p} its parent, {h} a hash, {n} a name,
    // {c} the name with a forbidden character, {k} a hash of the wrong
    // length, {w} one with a wrong character, {l} too long a name, {b} a blank.
    let templates: Vec<&str> = "{o} {o} {o} {s}x/{h}-{n} {p}/{h}-{n} {h}-{n} {s}/ {s} {s}//{h}-{n} \
        {s}/.. {s}/../etc/passwd {s}/{h}-{n}/.. {s}/{h}-.. {s}/{h}-. {s}/./{h}-{n} {s}/{h}-../../x \
        {s}/../{h}-{n} -{h}-{n} {s}/-{h}-{n} {s}/{h}-{c} {s}/{h}-{c} {s}/{k}-{n} {s}/{w}-{n} {s}/{h}- \
        {s}/{h}-{l} {s}/{h}-.{n} {s}/{h} {s}/{h}{n} {s}/{h}-{n}/bin {s}/{h}-$(id) {s}/{h}-x;id \
        {s}/{h}-`id` {b}{s}/{h}-{n}"
        .split(' ')
        .collect();
    let parent = Path::new(store).parent().unwrap().display().to_string();
    let values = [
        ("{s}", store.to_string()),
        ("{p}", parent),
        ("{h}", h.clone()),
        ("{n}", n.clone()),
        ("{k}", gen_chars(rng, NIX_BASE32, len)),
        ("{w}", format!("{}{wrong}{}", &h[..at_h], &h[at_h + 1..])),
        ("{l}", "n".repeat(MAX_NAME + 1 + rng.below(50))),
        ("{b}", rng.pick(&[" ", "\t", "\0", "\u{feff}"]).to_string()),
        ("{o}", rng.pick(&odd).to_string()),
        ("{c}", format!("{}{c}{}", &n[..at], &n[at..])),
    ];
    let t = rng.pick(&templates).to_string();
    values.iter().fold(t, |t, (k, v)| t.replace(k, v))
}

/// One fuzz worker: its generator and what it saw.
struct Fuzzer<'a> {
    rng: Rng,
    store: &'a str,
    pool: &'a [String],
    t: &'a Mutex<Tally>,
}

/// What the fuzz saw, summed over workers.
#[derive(Default)]
struct Tally {
    requests: usize,
    refused: usize,
    ok_sum: usize,
    queued: HashSet<String>,
}

impl Fuzzer<'_> {
    fn good(&mut self) -> String {
        self.rng.pick(self.pool).clone()
    }

    fn valid_enqueue(&mut self) -> String {
        let paths: Vec<String> = (0..self.rng.range(1, 20)).map(|_| self.good()).collect();
        format!("enqueue {}", paths.join(" "))
    }

    /// One generated case; may contain `\n` (then it is several lines).
    fn case(&mut self) -> Vec<u8> {
        let store = self.store;
        let pick = self.rng.below(100);
        let (good, drv) = (self.good(), gen_path(&mut self.rng, store, ".drv"));
        let line = match pick {
            // Valid requests: about a quarter.
            0..=15 => self.valid_enqueue(),
            16..=19 => format!("drv {drv}"),
            20..=23 => "ping".into(),
            // Random bytes, no newline.
            24..=33 => {
                let len = self.rng.range(0, 200);
                return self.rng.bytes(len, b'x');
            }
            // Random printable text after a verb.
            34..=37 => {
                let verbs = ["enqueue", "drv", "ping", "status", "wait", "retry", "x"];
                let verb = self.rng.pick(&verbs);
                let len = self.rng.range(0, 80);
                let printable: Vec<u8> = (b' '..=b'~').collect();
                let tail = gen_chars(&mut self.rng, &printable, len);
                format!("{verb} {tail}")
            }
            // A valid line cut short, or with NUL or a non-UTF-8 byte inside.
            38..=49 => {
                let mut l = self.valid_enqueue().into_bytes();
                let at = self.rng.below(l.len() + 1);
                let bad = b"\0|\xff|\xc3|\xed\xa0\x80|\xf8\x88\x80\x80\x80";
                let bad: Vec<&[u8]> = bad.split(|&b| b == b'|').collect();
                if pick < 44 {
                    l.truncate(at);
                } else {
                    l.splice(at..at, self.rng.pick(&bad).iter().copied());
                }
                return l;
            }
            // One edge-case path among valid ones, or as a derivation.
            50..=69 => {
                let mut paths: Vec<String> =
                    (0..self.rng.range(0, 4)).map(|_| self.good()).collect();
                let at = self.rng.below(paths.len() + 1);
                paths.insert(at, gen_edge_path(&mut self.rng, store));
                format!("enqueue {}", paths.join(" "))
            }
            70..=74 => format!("drv {}", gen_edge_path(&mut self.rng, store)),
            // `.drv` where an output is expected, and the reverse.
            75..=76 => format!("enqueue {good} {drv}"),
            77..=78 => format!("drv {good}"),
            // Verb-level oddities.
            79..=88 => {
                let v: Vec<&str> = "|\r| |ENQUEUE {g}|Ping|PING|ping |ping x|ping\0|\u{feff}ping|\
                    status now|wait 1|retry all|enqueue|enqueue |enqueue  {g}| enqueue {g}|\
                    enqueue\t{g}|enqueue {g} |enqueue {g}\r|enqueue {g}\r\r|drv|drv |drv {d} {d}|\
                    drv {d}\r|drv  {d}|enqueue-x|status\r"
                    .split('|')
                    .collect();
                self.rng.pick(&v).replace("{g}", &good).replace("{d}", &drv)
            }
            // A newline inside a path: two lines on the wire.
            89..=93 => {
                let at = self.rng.range(1, good.len() - 1);
                format!("enqueue {}\n{}", &good[..at], &good[at..])
            }
            // Too many paths (about 900 KB, still under the line limit
            // unless long names made it too long: the cap still applies).
            94 if self.rng.below(100) < 15 => {
                let n = MAX_PATHS + self.rng.range(1, 3);
                let paths: Vec<String> = self.pool.iter().cycle().take(n).cloned().collect();
                let mut line = format!("enqueue {}", paths.join(" "));
                if line.len() >= MAX_LINE {
                    line = format!("enqueue {}", vec!["x"; n].join(" "));
                }
                line
            }
            _ => format!("enqueue {}", gen_edge_path(&mut self.rng, store)),
        };
        line.into_bytes()
    }

    /// A line of at least MAX_LINE bytes before its newline.
    fn over_long(&mut self) -> Vec<u8> {
        let mut paths = b"enqueue".to_vec();
        while paths.len() < MAX_LINE {
            paths.push(b' ');
            paths.extend(self.good().bytes());
        }
        let len = MAX_LINE + self.rng.range(1, 300_000);
        let mut lines = vec![paths, vec![b'a'; MAX_LINE], self.rng.bytes(len, 0)];
        lines.swap_remove(self.rng.below(3))
    }

    /// One connection: send up to 120 cases (and maybe an unterminated
    /// fragment or an over-long last line), then check every reply.
    fn round(&mut self, socket: &Path, round: &str) {
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for _ in 0..self.rng.range(1, 120) {
            lines.extend(self.case().split(|&b| b == b'\n').map(<[u8]>::to_vec));
        }
        let wire = |ls: &[Vec<u8>]| [ls.join(&b'\n'), vec![b'\n']].concat();
        let mut expects: Vec<Expect> = lines.iter().map(|l| model(l, self.store)).collect();
        // How the connection ends: normally, with a fragment that has no
        // newline, with an over-long line (the daemon then closes), or
        // rudely: the client hangs up without reading a reply (malformed
        // requests only, so nothing unacknowledged can be journaled).
        let ending = self.rng.below(100);
        if ending >= 95 {
            lines.retain(|l| matches!(model(l, self.store), Expect::Err(_)));
            if let Ok(mut s) = UnixStream::connect(socket) {
                let _ = s.set_write_timeout(Some(REPLY_TIMEOUT));
                let _ = s.write_all(&wire(&lines));
            }
            return;
        }
        let mut data = wire(&lines);
        if ending < 8 {
            let mut frag = self.case();
            frag.retain(|&b| b != b'\n');
            data.extend(if frag.is_empty() { b"p".to_vec() } else { frag });
            expects.push(err1("not terminated by a newline"));
        } else if ending < 13 {
            data.extend(self.over_long());
            data.extend(b"\nping\n");
            expects.push(err1("longer than 1048576 bytes"));
        }
        let reply_lines = exchange(socket, data, round);
        let final_line = |l: &String| matches!(l.split(' ').next(), Some("ok" | "err"));
        let replies: Vec<&[String]> = reply_lines.split_inclusive(final_line).collect();
        let n = expects.len();
        assert_eq!(replies.len(), n, "{round}: replies {replies:?}");
        let mut t = self.t.lock().unwrap_or_else(|e| e.into_inner());
        for (i, (e, r)) in expects.iter().zip(replies).enumerate() {
            let line = lines
                .get(i)
                .map(|l| String::from_utf8_lossy(&l[..l.len().min(200)]));
            let n = check_reply(e, r).unwrap_or_else(|why| panic!("{round} #{i} {line:?}: {why}"));
            t.requests += 1;
            t.ok_sum += n;
            match e {
                Expect::Queue(paths) => t.queued.extend(paths.iter().cloned()),
                Expect::Err(_) => t.refused += 1,
                _ => {}
            }
        }
    }
}

/// Thousands of generated requests, malformed and valid, over 6 concurrent
/// connections at a time: each gets exactly the one reply the model predicts
/// (`err` naming the broken rule for every malformed one), the daemon stays
/// up without a panic, and the journal holds exactly the valid paths that
/// were sent and acknowledged.
#[test]
fn protocol_fuzz_every_malformed_request_gets_one_err_and_the_journal_stays_clean() {
    let seed = fuzz_seed();
    let ctx = format!("fuzz seed {seed} (replay: NPBHQ_FUZZ_SEED={seed})");
    eprintln!("{ctx}");
    let env = NixEnv::new("hostile-fuzz");
    let (mut d, _w) = hanging_daemon(&env);
    let store = env.store_dir().display().to_string();
    let socket = d.socket();
    let mut rng = Rng::new(seed);
    let pool: Vec<String> = (0..1500).map(|_| gen_path(&mut rng, &store, "")).collect();
    for p in &pool {
        assert!(path_rules(p, &store, false).is_empty(), "{ctx}: {p}");
    }
    // `NPBHQ_FUZZ_ROUNDS=N` for a longer run by hand.
    let rounds = std::env::var("NPBHQ_FUZZ_ROUNDS").map_or(14, |r| r.parse().unwrap());
    let total = Mutex::new(Tally::default());
    thread::scope(|s| {
        for w in 1..=6u64 {
            let rng = Rng::new(seed ^ w.wrapping_mul(0x9e37_79b9));
            let mut f = Fuzzer {
                rng,
                store: &store,
                pool: &pool,
                t: &total,
            };
            let (socket, ctx) = (&socket, &ctx);
            s.spawn(move || {
                for round in 0..rounds {
                    f.round(socket, &format!("{ctx}: worker {w} round {round}"));
                }
            });
        }
    });
    let t = total.into_inner().unwrap();
    let (requests, refused, queued) = (t.requests, t.refused, t.queued);
    eprintln!("{ctx}: {requests} requests, {refused} refused");
    let enough = requests >= 2000 && refused >= 1000;
    assert!(enough, "{ctx}: {requests} requests, {refused} refused");

    assert_alive(&mut d, &ctx);
    let why = "sum of `ok N` differs from the number of distinct valid paths sent";
    assert_eq!(t.ok_sum, queued.len(), "{ctx}: {why}");
    let j = d.journal();
    let malformed = &j.malformed;
    assert!(malformed.is_empty(), "{ctx}: malformed: {malformed:?}");
    let added: HashSet<&String> = j.added.iter().collect();
    assert_eq!(added.len(), j.added.len(), "{ctx}: a path journaled twice");
    for p in &j.added {
        assert!(queued.contains(p), "{ctx}: journaled, never acked: {p:?}");
        let valid = path_rules(p, &store, p.ends_with(".drv")).is_empty();
        assert!(valid, "{ctx}: invalid path in the journal: {p:?}");
    }
    let live: HashSet<&String> = j.live.iter().collect();
    for p in &queued {
        assert!(added.contains(p), "{ctx}: acked, not journaled: {p:?}");
        // Only derivations leave the queue here (the worker drops the ones
        // that are not in the store; the hanging `nix copy` holds the rest).
        let left = !live.contains(p) && !p.ends_with(".drv");
        assert!(!left, "{ctx}: {p} left the journal without an upload");
    }
    for p in &j.done {
        let drv = p.ends_with(".drv") && added.contains(p);
        assert!(drv, "{ctx}: unexpected `-` record for {p}");
    }
    wait_until_diag(
        Duration::from_secs(30),
        "status `queued` to match the journal",
        || d.status().num("queued") as usize == d.journal().live.len(),
        || format!("{ctx}\nstatus: {:?}", d.status()),
    );
}

/// 64 clients enqueue 1,000 paths each and re-send 100 of their neighbour's,
/// beside 100 idle connections: each path is acknowledged as new once and
/// journaled once, a hook meanwhile is acknowledged (not spooled), and the
/// journal replayed after a kill -9 gives the same queue.
#[test]
fn load_64_clients_with_100_idle_connections_every_path_acked_once() {
    const CLIENTS: usize = 64;
    const PER_CLIENT: usize = 1000;
    const SHARED: usize = 100;
    let seed = fuzz_seed();
    let env = NixEnv::new("hostile-load");
    let (mut d, _w) = hanging_daemon(&env);
    let store = env.store_dir().display().to_string();
    let socket = d.socket();
    let path = |i: usize| format!("{store}/{}-load-{i}", index_hash(seed, i));

    // The idle connections: accepted (a ping on a later connection is
    // answered, and accept is in order), then left silent.
    let idle: Vec<_> = (0..100)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    assert!(ask(&socket, "ping").starts_with("ok "));

    let hook_path = format!("{store}/{}-load-hook", index_hash(seed ^ 1, 0));
    let client = |c: usize| {
        let mut rng = Rng::new(seed ^ (c as u64 + 7).wrapping_mul(0x1234_5678_9abc));
        let mut mine: Vec<String> = (c * PER_CLIENT..(c + 1) * PER_CLIENT).map(path).collect();
        let next = (c + 1) % CLIENTS;
        mine.extend((0..SHARED).map(|_| path(next * PER_CLIENT + rng.below(PER_CLIENT))));
        // Shuffle (Fisher-Yates) so shared paths race.
        for i in (1..mine.len()).rev() {
            mine.swap(i, rng.below(i + 1));
        }
        let conn = UnixStream::connect(&socket).expect("connect");
        let mut sum = 0;
        while !mine.is_empty() {
            let n = rng.range(1, 100).min(mine.len());
            let paths: Vec<String> = mine.drain(..n).collect();
            let line = format!("enqueue {}", paths.join(" "));
            let reply = send(&conn, &line).unwrap_or_else(|e| panic!("client {c}: {e}"));
            let k = reply.strip_prefix("ok ").and_then(|k| k.parse().ok());
            let k: usize = k.unwrap_or_else(|| panic!("client {c}: reply {reply:?}"));
            assert!(k <= n, "client {c}: ok {k} for {n} paths");
            sum += k;
        }
        sum
    };
    let started = Instant::now();
    let (sums, hook_out) = thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS).map(|c| s.spawn(move || client(c))).collect();
        // The hook, while the clients run; a generous timeout: the outcome
        // (acknowledged, not spooled) is under test, not its speed.
        let mut hook = root_hook(&socket, &d.spool_dir(), &hook_path);
        let hook = run(hook.env("NPBHQ_TIMEOUT", "20"));
        let sums: Vec<usize> = clients.into_iter().map(|h| h.join().unwrap()).collect();
        (sums, hook)
    });
    let secs = started.elapsed().as_secs_f64();
    eprintln!("load: {CLIENTS} x {PER_CLIENT} paths acked in {secs:.2} s");
    let acked = hook_out.status.success() && hook_out.stderr.is_empty();
    assert!(acked, "the hook was not acknowledged: {}", show(&hook_out));
    let spooled = spooled(&d.spool_dir());
    assert!(spooled.is_empty(), "the hook spooled: {spooled:?}");
    drop(idle);

    let why = "sum of `ok N` over all clients (each path is new exactly once)";
    assert_eq!(sums.iter().sum::<usize>(), CLIENTS * PER_CLIENT, "{why}");
    let j = d.journal();
    assert!(j.malformed.is_empty(), "malformed: {:?}", j.malformed);
    assert!(j.done.is_empty(), "nothing can have finished: {:?}", j.done);
    let got: HashSet<&String> = j.added.iter().collect();
    assert_eq!(got.len(), j.added.len(), "a path was journaled twice");
    let mut expected: HashSet<String> = (0..CLIENTS * PER_CLIENT).map(path).collect();
    expected.insert(hook_path.clone());
    let n = expected.len();
    let missing = expected.iter().filter(|p| !got.contains(p)).count();
    let journaled = got.len();
    let ok = journaled == n && missing == 0;
    assert!(ok, "journal: {journaled} paths, {missing} missing");
    assert_eq!(d.status().num("queued") as usize, n);
    assert_alive(&mut d, "after load");

    d.kill9();
    d.try_spawn().unwrap_or_else(|e| panic!("restart: {e}"));
    let queued = d.status().num("queued") as usize;
    assert_eq!(queued, n, "queue after kill -9 and replay");
    let replayed = format!("replayed: {n} paths queued");
    assert!(d.log().contains(&replayed), "{replayed}");
    assert_alive(&mut d, "after replay");
}

/// Socket mode 0660 with a group: a user outside the group is denied (the
/// CLI says so in one line) for status, enqueue and retry; a member may do
/// all three. With the default mode 0600 even the member is denied. A
/// signing key the daemon's user cannot read stops the daemon with one
/// line naming the file. Another user's daemon, on a socket that user bound,
/// would keep or drop root's paths as it pleases: root's hook refuses it in
/// one line and spools, root's admin commands refuse it (exit 2, one line),
/// nothing reaches its journal; it serves its own user's hook, so the
/// refusal is about the owner, not the socket.
#[test]
fn access_socket_mode_group_and_owner_decide_who_may_connect() {
    let env = NixEnv::new("hostile-access");
    let g = User::group('g');
    let group = g.name.as_str();
    let (outsider, member) = (User::new('o', ""), User::new('m', group));
    let d = Daemon::start(&env, &[("socket-mode", "0660"), ("socket-group", group)]);
    fs::set_permissions(d.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let socket = d.socket();
    let sock_s = socket.display().to_string();
    let meta = fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "socket mode");
    let owner = run_ok(Command::new("stat").args(["-c", "%G"]).arg(&socket));
    assert_eq!(owner.trim(), group, "socket group");

    let store = env.store_dir().display().to_string();
    let p_out = format!("{store}/{}-outsider", index_hash(1, 1));
    let p_mem = format!("{store}/{}-member", index_hash(1, 2));
    // The CLI refuses to enqueue a path that does not exist.
    fs::write(&p_mem, "").unwrap();
    let verbs = ["status", "enqueue", "retry"];
    let [status, enqueue, retry] = verbs.map(|v| format!("{v} --socket {sock_s}"));
    for args in [status.clone(), format!("{enqueue} {p_out}"), retry.clone()] {
        let err = one_line(&outsider.cli(env.root(), &args, &[]), 2, &args);
        let why = err.to_lowercase().contains("permission denied") && err.contains(&sock_s);
        assert!(why, "{args:?} should explain the refusal: {err:?}");
        // Not blamed on a missing daemon: that would send the user the wrong way.
        let missing = err.contains("no daemon") || err.contains("is post-build-hook-queue running");
        assert!(!missing, "{args:?}: not a missing daemon: {err:?}");
    }
    for args in [status, format!("{enqueue} {p_mem}")] {
        let o = member.cli(env.root(), &args, &[]);
        assert!(o.status.success(), "{args:?} as member: {}", show(&o));
    }
    // Changing the queue is for root and the daemon's user only.
    let o = member.cli(env.root(), &retry, &[]);
    assert!(!o.status.success(), "retry as member: {}", show(&o));
    let only = d.journal().added == [p_mem];
    assert!(only, "only the member's path is queued");

    let d2 = Daemon::start(&env, &[]);
    fs::set_permissions(d2.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let mode = fs::metadata(d2.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);
    let status = format!("status --socket {}", d2.socket().display());
    let err = one_line(&member.cli(env.root(), &status, &[]), 2, &status);
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
    assert!(ask(&d2.socket(), "ping").starts_with("ok "));

    let (sk, _) = env.gen_signing_key("access-1");
    fs::set_permissions(&sk, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(sk.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    let udir = owned_dir(env.root(), "as-user", outsider.uid, 0o700);
    let sk_s = sk.display().to_string();
    let args = format!("--socket {0}/sock --state-dir {0}/state", udir.display());
    let args = format!("serve {args} --signing-key-file {sk_s}");
    let err = one_line(&outsider.cli(env.root(), &args, &env.env_vars()), 78, &args);
    let named = err.contains(&sk_s) && err.to_lowercase().contains("permission denied");
    assert!(named, "should name the unreadable key file: {err:?}");
    assert!(!udir.join("sock").exists(), "no socket for a refused start");

    let (socket, state) = (udir.join("sock"), udir.join("state"));
    let (sock_s, state_s) = (socket.display().to_string(), state.display().to_string());
    let args = ["--socket", &sock_s, "--state-dir", &state_s];
    let _theirs = outsider.serve(env.root(), &args, &env.env_vars(), &socket);
    assert_eq!(fs::metadata(&socket).unwrap().uid(), outsider.uid);
    let path = |i, name| format!("{store}/{}-{name}", index_hash(7, i));
    let (p_root, p_cli) = (path(1, "sent-by-root"), path(2, "enqueued-by-root"));
    let p_own = path(3, "their-own");
    let spool = env.root().join("root-spool");
    assert_root_refuses(&socket, outsider.uid, &spool, [&p_root, &p_cli]);
    let mut hook = outsider.exe(env.root(), &hook_bin());
    let o = run(hook.env("NPBHQ_SOCKET", &socket).env("OUT_PATHS", &p_own));
    let served = o.status.success() && o.stderr.is_empty();
    assert!(served, "their own hook is served: {}", show(&o));
    let journal = fs::read_to_string(state.join("journal")).unwrap_or_default();
    assert!(journal.contains(&p_own), "their path: {journal}");
    let reached = journal.contains(&p_root) || journal.contains(&p_cli);
    assert!(!reached, "root's paths reached their daemon: {journal}");
}

/// Where a user's daemon, hook and admin commands look when nothing is
/// set. The state directory in `$TMPDIR` (a user with neither `HOME` nor
/// `XDG_STATE_HOME`) is used only when it is the user's own: one that
/// another user made, or that others may write, stops `serve` and
/// `check-config` with exit 78 naming it, before anything is written there.
/// A setting from the environment is checked like the file's (a relative
/// `XDG_RUNTIME_DIR` is refused, naming the variable). Without
/// `XDG_RUNTIME_DIR` the socket is `socket` in the user's own state
/// directory (`~/.local/state/nix-post-build-hook-queue/`), never a name in
/// `/tmp` that another user could bind first, and all of them find it there.
#[test]
fn default_socket_and_state_dir_are_the_users_own() {
    let env = NixEnv::new("hostile-dsock");
    let user = User::new('d', "");
    let tmp = owned_dir(env.root(), "tmp", 0, 0o1777);
    let state = tmp.join(format!("nix-post-build-hook-queue-{}", user.uid));
    fs::create_dir(&state).unwrap();
    let vars = [("TMPDIR".to_string(), tmp.clone().into_os_string())];
    // Root's (another user's to them), then theirs but writable by all.
    for owner in [0, user.uid] {
        std::os::unix::fs::chown(&state, Some(owner), Some(owner)).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        for command in ["check-config", "serve"] {
            let o = user.cli(env.root(), command, &vars);
            let err = one_line(&o, 78, &format!("{command}, {owner}"));
            let named = err.contains("$TMPDIR") && err.contains(&*state.to_string_lossy());
            assert!(named, "{err}");
            assert!(fs::read_dir(&state).unwrap().next().is_none(), "written to");
        }
    }
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    let o = user.cli(env.root(), "check-config", &vars);
    assert_eq!(o.status.code(), Some(0), "their own: {}", show(&o));

    let home = owned_dir(env.root(), "h", user.uid, 0o700);
    let relative = [
        ("HOME".to_string(), home.clone().into_os_string()),
        ("XDG_RUNTIME_DIR".to_string(), "run/user".into()),
    ];
    let o = user.cli(env.root(), "check-config", &relative);
    let err = one_line(&o, 78, "relative");
    let named = err.starts_with("post-build-hook-queue: $XDG_RUNTIME_DIR: ");
    assert!(named, "{err}");

    let state = home.join(".local/state/nix-post-build-hook-queue");
    let mut vars = env.env_vars();
    vars.retain(|(k, _)| !k.starts_with("XDG_") && k != "HOME");
    vars.push(("HOME".into(), home.into()));
    let _daemon = user.serve(env.root(), &[], &vars, &state.join("socket"));
    let in_tmp = PathBuf::from(format!("/tmp/nix-post-build-hook-queue-{}.sock", user.uid));
    assert!(!in_tmp.exists(), "{} exists", in_tmp.display());

    let path = format!("{}/{}-default", env.store_dir().display(), index_hash(8, 1));
    let mut hook = user.exe(env.root(), &hook_bin());
    let o = run(hook.envs(vars.clone()).env("OUT_PATHS", &path));
    let served = o.status.success() && o.stderr.is_empty();
    assert!(served, "the hook at the default socket: {}", show(&o));
    let spooled = spooled(&state.join("spool"));
    assert!(spooled.is_empty(), "nothing spooled: {spooled:?}");
    let o = user.cli(env.root(), "status", &vars);
    assert!(o.status.success(), "status: {}", show(&o));
    let journal = fs::read_to_string(state.join("journal")).unwrap_or_default();
    assert!(journal.contains(&path), "the path is journaled: {journal}");
}

/// Paths that would be options or shell (`--to`, `$(...)`, `;`, ...) sent
/// by every way in (socket, CLI, hook, spool) are refused before any command
/// is built: every argument the recorded nix got was the daemon's own or a
/// valid store path, and a valid path sent with a hostile one never reached
/// Nix or the cache.
#[test]
fn injection_hostile_paths_never_reach_a_nix_command_line() {
    let env = NixEnv::new("hostile-inject");
    let (sk, pk) = env.gen_signing_key("inject-1");
    let w = FakeNix::new(&env);
    let (upload, read) = file_cache(&env, "cache");
    let sk_s = sk.display().to_string();
    let mut d = Daemon::start(
        &env,
        &[
            ("signing-key-file", &sk_s),
            ("upload-to", &upload),
            ("nix", &w.nix()),
            ("retry-initial-delay", "0.05"),
        ],
    );
    let socket = d.socket();
    let store = env.store_dir().display().to_string();
    let built = strs(&env.build_paths(2, "inject"));
    let (bait, good) = (built[0].clone(), built[1].clone());
    let h = &bait[store.len() + 1..][..32];
    let marker = env.root().join("pwned");
    let m = marker.display().to_string();
    let hostile: Vec<String> =
        "--to,-L,--store=/x,--recursive,--key-file=/etc/shadow,-,$(touch {m}),\
        `touch {m}`,;touch {m},|touch {m},&&touch {m},{s}/{h}-x y,{s}/{h}-$(touch {m}),\
        {s}/{h}-`touch {m}`,{s}/{h}-x;touch,{s}/{h}-x|touch,{s}/{h}-x&touch,{s}/{h}->x,\
        {s}/{h}-x\ttouch,{s}/{h}-x\0y,{s}/../{h}-x,{s}/{h}-x/../../etc,{s}/-{h}-x,{s}/{h}-*,\
        {b} --to file:///tmp/npbhq-evil,{s}/{h}-x\n--to,{s}/{h}-x\r"
            .split(',')
            .map(|t| t.replace("{m}", &m).replace("{s}", &store))
            .map(|t| t.replace("{h}", h).replace("{b}", &bait))
            .collect();
    let spool = d.spool_dir();
    fs::create_dir_all(&spool).unwrap();
    for (i, bad) in hostile.iter().enumerate() {
        // On the socket and in the spool a line break ends the request (the
        // fuzz test covers that); it matters where arguments are joined into
        // a request: the CLI and the hook.
        if !bad.contains(['\n', '\r']) {
            for line in [format!("enqueue {bait} {bad}"), format!("drv {bad}")] {
                let replies = exchange(&socket, format!("{line}\n").into_bytes(), "inject");
                let refused = replies.len() == 1 && replies[0].starts_with("err ");
                assert!(refused, "{line:?} was not refused: {replies:?}");
            }
            let req = format!("enqueue {bait} {bad}\ndrv {bad}\nenqueue ").into_bytes();
            let req = [&req[..], b"\xff\xfe\n"].concat();
            fs::write(spool.join(format!("{i:020}-{i}.req")), req).unwrap();
        }
        // CLI (arguments are never options to the daemon; `-` is its own
        // "read stdin" argument, so not hostile there).
        if !bad.contains('\0') && bad != "-" {
            let o = run(d.cli_cmd().arg("enqueue").arg(&bait).arg(bad));
            assert!(!o.status.success(), "CLI enqueue {bad:?}: {}", show(&o));
        }
        // Hook: as OUT_PATHS and as DRV_PATH (it always exits 0; a refused
        // request is reported, not spooled, as it would be refused again).
        // OUT_PATHS is whitespace-separated: skip what splits into valid paths.
        let splits_valid =
            (bad.split_whitespace()).all(|w| path_rules(w, &store, false).is_empty());
        if bad.contains('\0') || splits_valid {
            continue;
        }
        for (out, drv) in [(format!("{bait} {bad}"), ""), (String::new(), bad.as_str())] {
            let o = run(d.hook_cmd().env("OUT_PATHS", &out).env("DRV_PATH", drv));
            let said = String::from_utf8_lossy(&o.stderr);
            let reported = said.contains("NOT queued") || said.contains("nothing to queue");
            let ok = o.status.success() && reported && !said.contains("spooled");
            assert!(ok, "hook {out:?}/{drv:?}: {}", show(&o));
        }
    }
    let req = |e: fs::DirEntry| e.file_name().to_string_lossy().ends_with(".req");
    let ingested = || fs::read_dir(&spool).map_or(true, |r| !r.flatten().any(req));
    let what = "the daemon to ingest (and refuse) every spool file";
    wait_until(Duration::from_secs(30), what, ingested);
    // Now the one legitimate path, so that nix has been called for sure.
    let o = run(d.cli_cmd().arg("enqueue").arg(&good));
    assert!(o.status.success(), "{}", show(&o));
    wait_ok(UPLOAD_TIMEOUT, "the legitimate path uploaded", || {
        env.verify_in_cache(&read, &pk, &[PathBuf::from(&good)])
    });

    let calls = w.calls();
    let with_good = calls.iter().any(|c| c.contains(&good));
    assert!(with_good, "no call with the good path: {calls:?}");
    // The daemon's own arguments; `ping`, `info` and `--store` for the
    // target's check at start (and when a path fails alone), `--version` for
    // the choice between `store info` and `store ping`.
    let allowed = "--extra-experimental-features nix-command store sign --key-file --recursive \
        copy --to --query --outputs --check-validity --print-invalid ping info --store --version";
    let allowed: HashSet<&str> = allowed.split(' ').chain([sk_s.as_str(), &upload]).collect();
    for call in &calls {
        for (i, arg) in call.iter().enumerate().skip(1) {
            let ok = allowed.contains(arg.as_str())
                || path_rules(arg, &store, false).is_empty()
                || path_rules(arg, &store, true).is_empty();
            assert!(ok, "argument {i} {arg:?} reached nix: {call:?}");
        }
        assert!(!call.contains(&bait), "sent with a hostile one: {call:?}");
    }
    assert!(!marker.exists(), "a shell ran a hostile command");
    let uploaded = env.is_valid_in(&read, Path::new(&bait));
    assert!(!uploaded, "the path sent with a hostile one was uploaded");
    let j = d.journal();
    let only_good = j.added.iter().all(|p| *p == good);
    assert!(only_good, "only the good path is journaled: {:?}", j.added);
    assert_alive(&mut d, "injection");
}

/// The base64 part of a secret key file (`name:base64`).
fn key_secret(sk: &Path) -> String {
    let text = fs::read_to_string(sk).unwrap();
    let (_, b64) = text.trim().split_once(':').expect("name:base64");
    assert!(b64.len() > 40, "key {b64:?}");
    b64.to_string()
}

/// Nothing the daemon shows a person (`status`, its log, `status --json`,
/// the raw `status` reply) holds a secret. Signing with a key file and a
/// target URL carrying `secret-key=`: the key's contents appear nowhere, and
/// the URL's secret query value is shown as `***`. A target URL with
/// `user:password@` that fails: nix's own error message repeats the URL
/// (`ssh-ng://`), or its `user:password@host` part without the scheme
/// (`ssh://`), and still the password appears nowhere (the failure text
/// included), while the masked form does.
#[test]
fn secrets_never_shown_and_url_secrets_masked_even_in_nix_errors() {
    let env = NixEnv::new("hostile-secret");
    let (sk, pk) = env.gen_signing_key("secret-1");
    let (secret, sk_s) = (key_secret(&sk), sk.display().to_string());
    let (upload, read) = file_cache(&env, "cache");
    let upload = format!("{upload}&secret-key={sk_s}");
    let config = [
        ("signing-key-file", sk_s.as_str()),
        ("upload-to", &upload),
        ("retry-initial-delay", "0.05"),
    ];
    let d = Daemon::start(&env, &config);
    let b = env.build(2, "secret", Some(&hook_bin()), &d.hook_env());
    b.assert_success();
    wait_ok(UPLOAD_TIMEOUT, "uploaded and signed", || {
        env.verify_in_cache(&read, &pk, &b.out_paths)
    });
    let everything_shown = |d: &Daemon| {
        let json = run_ok(d.cli_cmd().args(["status", "--json"]));
        let raw = exchange(&d.socket(), b"status\n".to_vec(), "status").join("\n");
        let status = run_ok(d.cli_cmd().arg("status"));
        [
            ("status", status),
            ("log", d.log()),
            ("status --json", json),
            ("raw status", raw),
        ]
    };
    for (i, (what, text)) in everything_shown(&d).iter().enumerate() {
        assert!(!text.contains(&secret), "{what} shows the key: {text}");
        let url_secret = text.contains(&format!("secret-key={sk_s}"));
        assert!(!url_secret, "{what} shows the URL's secret-key: {text}");
        let masked = text.contains("secret-key=***");
        assert!(masked || i >= 2, "{what} shows the masked target: {text}");
    }

    for scheme in ["ssh-ng", "ssh"] {
        let password = format!("hunter2pw{}", unique_id());
        // Nothing listens on this port: ssh fails fast, and nix says so.
        let url = format!("{scheme}://npbhq:{password}@127.0.0.1?secret-key=/npbhq/x");
        let opts = "-o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no";
        let sshopts = format!("-p {} {opts} -o UserKnownHostsFile=/dev/null", free_port());
        let config = [("upload-to", url.as_str()), ("retry-initial-delay", "60")];
        let d = Daemon::start_with_env(&env, &config, &[("NIX_SSHOPTS", sshopts.as_str())]);
        let o = run(d.cli_cmd().arg("enqueue").arg(&b.out_paths[0]));
        assert!(o.status.success(), "{}", show(&o));
        let what = "the failed upload to show in status";
        wait_until(UPLOAD_TIMEOUT, what, || {
            d.status().get("backing-off") == "1"
        });
        let shown = everything_shown(&d);
        let log = &shown[1].1;
        let logged = log.contains("nix copy failed");
        assert!(logged, "{scheme}: the failure is logged: {log}");
        for (what, text) in &shown {
            let shows = text.contains(&password);
            assert!(!shows, "{scheme}: {what} shows the password: {text}");
            let url_secret = text.contains("secret-key=/npbhq/x");
            assert!(!url_secret, "{scheme}: {what} shows the secret-key: {text}");
            let masked = text.contains("npbhq:***@127.0.0.1");
            assert!(masked, "{scheme}: {what} shows the masked target: {text}");
        }
    }
}

/// A setting that cannot work stops `serve` before it opens its socket,
/// with one line naming the setting and the problem (exit 78): a signing
/// key file others can read, one that is missing, a directory, a FIFO, or a
/// file that is not a Nix secret key (the public key, say); a line break or
/// any control character in a setting, from a flag or the config file (in
/// `upload-to` it would break the framing of `status` replies).
#[test]
fn bad_key_files_and_control_characters_refused_at_start() {
    let env = NixEnv::new("hostile-keyperm");
    let (sk, pk) = env.gen_signing_key("perm-1");
    let secret = key_secret(&sk);
    let refused = |d: &Daemon, args: &[&str]| {
        let mut cmd = d.cli_cmd();
        cmd.args(["serve", "--config"])
            .arg(d.config_path())
            .args(args);
        let o = run_to_exit(&mut cmd, DAEMON_START_TIMEOUT);
        assert!(!d.socket().exists(), "no socket for a refused start");
        let err = one_line(&o, 78, &format!("serve {args:?}"));
        assert!(!err.contains(&secret), "{err}");
        err
    };
    let file = |name: &str, contents: &str, mode: u32| {
        let p = env.root().join(name);
        fs::write(&p, contents).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let open_key = file("open-key", &fs::read_to_string(&sk).unwrap(), 0o644);
    let public = file("public-key", &pk, 0o600);
    let garbage = file("garbage-key", "not a key\n", 0o600);
    let [missing, dir, fifo] = ["no-such-key", "key-dir", "key-fifo"].map(|n| env.root().join(n));
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    run_ok(Command::new("mkfifo").arg("-m").arg("600").arg(&fifo));
    for (key, want) in [
        (&open_key, "readable by every user"),
        (&missing, "No such file"),
        (&dir, "is a directory"),
        (&fifo, "not a regular file"),
        (&public, "does not hold a Nix secret key"),
        (&garbage, "does not hold a Nix secret key"),
    ] {
        let key_s = key.display().to_string();
        let d = Daemon::new_stopped(&env, &[("signing-key-file", key_s.as_str())], NO_ENV);
        let err = refused(&d, &[]);
        let named = err.contains(&key_s) && err.contains(want);
        assert!(named, "naming the file and the problem ({want}): {err:?}");
    }

    let d = Daemon::new_stopped(&env, NO_ENV, NO_ENV);
    for (flag, value) in [
        ("--upload-to", "file:///tmp/c\nok 5"),
        ("--upload-to", "file:///tmp/c\rx"),
        ("--socket-group", "wheel\u{1b}[2J"),
        ("--nix", "/bin/nix\tx"),
    ] {
        let err = refused(&d, &[flag, value]);
        let why = err.contains(flag) && err.contains("control character");
        assert!(why, "{err:?}");
    }
    // In the file too: a carriage return survives `lines()`.
    let socket = d.socket().display().to_string();
    let config = format!("socket = {socket}\nupload-to = file:///tmp/c\rok\n");
    fs::write(d.config_path(), config).unwrap();
    let err = refused(&d, &[]);
    let why = err.contains(":2:") && err.contains("control character");
    assert!(why, "{err:?}");
    let d = Daemon::start(&env, &[("signing-key-file", &sk.display().to_string())]);
    assert!(d.request("ping").starts_with("ok"));
}

/// A request of exactly 1 MiB (newline included) is served; one byte more,
/// or any longer line, gets one `err` line and the connection is closed (the
/// request after it is not answered); the daemon keeps serving. So it does
/// when its log reader went away (stderr a pipe with no reader, e.g. after
/// `post-build-hook-queue serve 2>&1 | head`): each log line fails with
/// EPIPE, which the daemon ignores, and SIGPIPE must not end it (its `main`
/// skips std's start-up, which would ignore the signal). The start-up lines
/// and a worker's warning are written into the broken pipe.
#[test]
fn limits_over_long_lines_and_a_log_reader_gone_leave_the_daemon_serving() {
    let env = NixEnv::new("hostile-long");
    let cache = format!("file://{}", env.root().join("cache").display());
    let mut d = Daemon::start(&env, &[("upload-to", &cache)]);
    let socket = d.socket();
    let store = env.store_dir().display().to_string();

    // Exactly MAX_LINE bytes with the newline: valid paths with long names.
    let per = store.len() + 35; // " <store>/<32-char hash>-"
    let body = MAX_LINE - "enqueue\n".len();
    let n = body.div_ceil(per + MAX_NAME);
    let (len, extra) = ((body - n * per) / n, (body - n * per) % n);
    let name = |i| "x".repeat(len + usize::from(i < extra));
    let paths: Vec<String> = (0..n)
        .map(|i| format!("{store}/{}-{}", index_hash(9, i), name(i)))
        .collect();
    let line = format!("enqueue {}\n", paths.join(" "));
    assert_eq!(line.len(), MAX_LINE);
    let replies = exchange(&socket, format!("{line}ping\n").into_bytes(), "max line");
    let short: Vec<&str> = replies.iter().map(|r| tail(r, 200)).collect();
    let n = replies.len();
    assert_eq!(n, 2, "{MAX_LINE} bytes, then ping: {short:?}");
    let ok =
        replies[0].starts_with("ok ") && replies[1].starts_with("ok nix-post-build-hook-queue");
    assert!(ok, "{replies:?}");

    let over = format!("{} x", line.trim_end()).into_bytes();
    for (what, mut data) in [
        ("one byte over", vec![b'a'; MAX_LINE]),
        ("over-long enqueue", over),
        ("4 MiB without newline", vec![b'z'; 4 * MAX_LINE]),
    ] {
        data.extend_from_slice(b"\nping\n");
        let replies = exchange(&socket, data, what);
        let n = replies.len();
        assert_eq!(n, 1, "{what}: one reply, then close: {replies:?}");
        let long =
            replies[0].starts_with("err ") && replies[0].contains("longer than 1048576 bytes");
        assert!(long, "{what}: {replies:?}");
    }
    assert_alive(&mut d, "after over-long lines");
    d.restart_with_stderr_gone();
    // Well-formed but never built: the worker drops it with a warning.
    let bogus = format!("{store}/{}-npbhq-never-built", index_hash(10, 0));
    assert_eq!(d.request(&format!("enqueue {bogus}")), "ok 1");
    let dropped = || d.status().num("queued") == 0;
    wait_until(Duration::from_secs(30), "unbuilt paths dropped", dropped);
    assert_alive(&mut d, "after logging into a pipe nobody reads");
}

/// A client that trickles one byte per second, and one that sends nothing,
/// are each dropped with one `err` line at the 10 s deadline (long before
/// the trickled line would be complete), while other clients are served
/// meanwhile. Takes about 10 s, in parallel with the other tests.
#[test]
fn limits_slow_and_silent_clients_are_dropped_others_are_served() {
    let env = NixEnv::new("hostile-slow");
    let mut d = Daemon::start(&env, &[]);
    let socket = d.socket();
    let store = env.store_dir().display().to_string();
    let slow_path = format!("{store}/{}-trickled", index_hash(3, 1));
    let line = format!("enqueue {slow_path}\n");
    let trickle_len = line.len();
    let until_closed = |s: UnixStream, what: &'static str| {
        thread::spawn(move || {
            let start = Instant::now();
            (read_until_closed(s, what), start.elapsed())
        })
    };
    let mut s = UnixStream::connect(&socket).unwrap();
    let trickled = until_closed(s.try_clone().unwrap(), "trickling client");
    let silent = until_closed(UnixStream::connect(&socket).unwrap(), "silent client");
    let trickler = thread::spawn(move || {
        let mut sent = 0;
        while sent < line.len() && s.write_all(&line.as_bytes()[sent..][..1]).is_ok() {
            sent += 1;
            thread::sleep(Duration::from_secs(1));
        }
        sent
    });
    // Others are served while both are connected.
    let fast_path = format!("{store}/{}-fast", index_hash(3, 2));
    for _ in 0..3 {
        assert!(ask(&socket, "ping").starts_with("ok "));
        thread::sleep(Duration::from_millis(300));
    }
    assert!(!trickled.is_finished() && !silent.is_finished());
    assert_eq!(ask(&socket, &format!("enqueue {fast_path}")), "ok 1");

    let (trickled, t_trickle) = trickled.join().unwrap();
    let (silent, t_silent) = silent.join().unwrap();
    let sent = trickler.join().unwrap();
    eprintln!("trickler dropped after {t_trickle:?} ({sent} bytes), silent after {t_silent:?}");
    assert!(sent < trickle_len, "the daemon waited for all {sent} bytes");
    let timeout = "no complete request line within 10 s";
    for lines in [trickled, silent] {
        assert_eq!(lines.len(), 1, "{lines:?}");
        let timed_out = lines[0].starts_with("err ") && lines[0].contains(timeout);
        assert!(timed_out, "{lines:?}");
    }
    let j = d.journal();
    let served = !j.added.contains(&slow_path) && j.added.contains(&fast_path);
    assert!(served, "{j:?}");
    assert_alive(&mut d, "after slow clients");
}

/// Each connection is served by a thread of its own, which ends with it:
/// clients one after another leave no thread behind, 32 connections held
/// open at once are served by 32 threads at once (not one after another),
/// and when they close the daemon is back to its idle threads.
#[test]
fn limits_a_thread_per_connection_that_ends_with_it() {
    let env = NixEnv::new("hostile-threads");
    let mut d = Daemon::start(&env, &[]);
    // The harness's start-up probe may still be served; wait for the
    // settled, idle set.
    thread::sleep(Duration::from_millis(200));
    let tasks = format!("/proc/{}/task", d.pid().expect("daemon running"));
    let threads = || fs::read_dir(&tasks).expect("read /proc/PID/task").count();
    let idle = threads();
    let settled = || threads() == idle;
    for i in 0..50 {
        assert!(ask(&d.socket(), "ping").starts_with("ok"), "ping {i}");
        wait_until(Duration::from_secs(10), "its thread ends", settled);
    }

    let socket = d.socket();
    let connect = |_| UnixStream::connect(&socket).unwrap();
    let burst: Vec<_> = (0..32).map(connect).collect();
    for mut s in &burst {
        s.write_all(b"ping\n").expect("send");
    }
    for (i, s) in burst.iter().enumerate() {
        // Served one after another, the second would wait for the first's
        // request timeout.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        let r = BufReader::new(s).read_line(&mut line);
        assert!(line.starts_with("ok"), "connection {i}: {line:?}, {r:?}");
    }
    let grown = threads();
    assert!(grown >= idle + 32, "at once: {grown} threads, {idle} idle");
    drop(burst);
    wait_until(Duration::from_secs(10), "the burst's threads end", settled);
    assert_alive(&mut d, "after the burst");
}

/// With `max-connections = 4`, four connections are served together; a
/// fifth gets `err busy` at once without sending anything, while the four
/// keep working; when one leaves, a new client is served again.
#[test]
fn limits_max_connections_busy_reply_while_others_work() {
    let env = NixEnv::new("hostile-busy");
    let mut d = Daemon::start(&env, &[("max-connections", "4")]);
    let socket = d.socket();
    let mut held: Vec<UnixStream> = Vec::new();
    wait_until(Duration::from_secs(20), "four served connections", || {
        let s = UnixStream::connect(&socket).unwrap();
        // A busy reply here means a probe connection still held a slot.
        if send(&s, "ping").is_ok_and(|l| l.starts_with("ok ")) {
            held.push(s);
        }
        held.len() == 4
    });
    let mut fifth = UnixStream::connect(&socket).unwrap();
    let busy = read_until_closed(fifth.try_clone().unwrap(), "fifth");
    assert_eq!(busy.len(), 1, "{busy:?}");
    assert!(busy[0].starts_with("err busy"), "{busy:?}");
    let _ = fifth.write_all(b"ping\n");
    for (i, s) in held.iter().enumerate() {
        let l = send(s, "ping").unwrap_or_else(|e| panic!("held connection {i}: {e}"));
        assert!(l.starts_with("ok nix-post-build-hook-queue"), "{l}");
    }
    // The slots free as each connection's thread sees its client leave, not
    // at the client's close: until then a ping may still get `err busy`.
    let served = || try_ask(&socket, "ping").is_ok_and(|l| l.starts_with("ok "));
    held.pop();
    wait_until(Duration::from_secs(20), "a free slot", served);
    drop(held);
    wait_until(Duration::from_secs(20), "every slot free again", served);
    assert_alive(&mut d, "after busy");
}

/// The socket is created 0600 by default with no temporary file left
/// beside it. One daemon per state directory: a second one on the same
/// state-dir (with another socket) says which pid holds it and exits 1,
/// before it touches the journal or binds its socket; the first keeps
/// serving. After `kill -9` the next start replaces the stale socket and
/// takes the lock. But the daemon never replaces something at the socket
/// path that is not a socket: a config mistake such as
/// `socket = /etc/important`, or a symlink, must not destroy a file.
#[test]
fn socket_0600_state_dir_locked_and_a_regular_file_never_replaced() {
    let env = NixEnv::new("hostile-sockfile");
    let mut d = Daemon::start(&env, &[]);
    let meta = fs::metadata(d.socket()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let mut entries: Vec<_> = fs::read_dir(d.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    entries.sort();
    let own = entries == ["config", "daemon.log", "sock", "state"];
    assert!(own, "only the daemon's own files: {entries:?}");

    let held = format!("{}-npbhq-held", "a".repeat(32));
    let path = env.store_dir().join(held);
    assert_eq!(d.request(&format!("enqueue {}", path.display())), "ok 1");
    let journal = d.state_dir().join("journal");
    let before = fs::read(&journal).unwrap();
    let other_socket = d.dir().join("second.sock");
    let mut second = d.cli_cmd();
    second.arg("serve").arg("--state-dir").arg(d.state_dir());
    second.arg("--socket").arg(&other_socket);
    let out = run_to_exit(&mut second, Duration::from_secs(20));
    let stderr = one_line(&out, 1, "second");
    let pid = d.pid().unwrap();
    let state = d.state_dir().display().to_string();
    let holder = format!("state-dir {state} is in use by another daemon (pid {pid})");
    assert!(stderr.contains(&holder), "{stderr}");
    let bound = fs::symlink_metadata(&other_socket).is_ok();
    assert!(!bound, "the second daemon bound no socket");
    assert_eq!(fs::read(&journal).unwrap(), before, "the journal untouched");
    assert!(ask(&d.socket(), "status").starts_with("ok"));
    assert_alive(&mut d, "after a second daemon was refused");

    d.kill9();
    let left = fs::symlink_metadata(d.socket()).is_ok();
    assert!(left, "kill -9 leaves the socket file");
    d.try_spawn()
        .expect("a stale socket or lock blocks no start");
    assert!(ask(&d.socket(), "ping").starts_with("ok "));
    let holder = fs::read_to_string(d.state_dir().join("lock")).unwrap();
    assert_eq!(holder.trim(), d.pid().unwrap().to_string());

    let precious = env.root().join("precious");
    fs::write(&precious, "keep me\n").unwrap();
    let link = env.root().join("link");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    for target in [&precious, &link] {
        let t = target.display().to_string();
        let mut d2 = Daemon::new_stopped(&env, &[("socket", t.as_str())], NO_ENV);
        let err = d2.try_spawn().expect_err("refuse what is not a socket");
        assert_eq!(fs::read_to_string(&precious).unwrap(), "keep me\n");
        let why = err.contains(&format!("{t} exists and is not a socket"));
        assert!(why, "{err}");
    }
    assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
}

/// Every socket path the kernel takes works, up to its limit of 107 bytes,
/// whatever the daemon's pid, in a directory of 101 bytes too, and leaves
/// nothing beside the socket.
#[test]
fn socket_paths_up_to_107_bytes_work() {
    let env = NixEnv::new("hostile-longsock");
    let base = owned_dir(env.root(), "s", 0, 0o755);
    let long = env.root().join("d-").display().to_string();
    let long = PathBuf::from(format!("{long:x<101}"));
    fs::create_dir(&long).unwrap();
    let room = 107 - base.as_os_str().len() - 1;
    assert!(room >= 20, "test directory {} too long", base.display());
    let named = |len| base.join(format!("{len:03}-{}", "x".repeat(room - 4 - (107 - len))));
    let sockets = (98..=107).map(|len| (len, named(len)));
    for (len, socket) in sockets.chain([(106, long.join("sock"))]) {
        assert_eq!(socket.as_os_str().len(), len);
        let s = socket.display().to_string();
        let mut d = Daemon::new_stopped(&env, &[("socket", s.as_str())], NO_ENV);
        d.try_spawn().unwrap_or_else(|e| panic!("{len} bytes: {e}"));
        assert!(ask(&socket, "ping").starts_with("ok "), "{len} bytes");
        let r = run(d.cli_cmd().arg("status"));
        assert!(r.status.success(), "{len} bytes: {r:?}");
        let mode = fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o600, "{len} bytes");
        d.stop();
    }
    for dir in [&base, &long] {
        let left: Vec<_> = fs::read_dir(dir).unwrap().collect();
        assert!(left.is_empty(), "nothing left beside the sockets: {left:?}");
    }
}

/// What another user may plant at `<socket>.<pid>.d` changes nothing: not a
/// symlink (a start must not delete `s` in the directory it points to), not
/// a directory (it must not stop the start). The shell plants them with the
/// pid it then `exec`s the daemon with.
#[test]
fn planted_names_beside_the_socket_change_nothing() {
    let env = NixEnv::new("hostile-planted");
    let [victim, blocker] = ["victim", "blocker"].map(|n| owned_dir(env.root(), n, 0, 0o755));
    fs::write(victim.join("s"), "keep me\n").unwrap();
    fs::write(blocker.join("s"), "keep me too\n").unwrap();
    let (v, b) = (victim.display(), blocker.display());
    for (what, plant, kept) in [
        ("a symlink", format!("ln -s '{v}'"), "keep me\n"),
        ("a directory", format!("cp -r '{b}'"), "keep me too\n"),
    ] {
        let d = Daemon::new_stopped(&env, NO_ENV, NO_ENV);
        let socket = d.socket();
        let script = format!("{plant} \"$1.$$.d\" && exec \"$0\" serve --config \"$2\"");
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(script).arg(daemon_bin()).arg(&socket);
        sh.arg(d.config_path()).stdout(Stdio::null());
        sh.envs(d.cli_cmd().get_envs().filter_map(|(k, v)| Some((k, v?))));
        let log = fs::File::create(d.log_path()).unwrap();
        let mut child = Running(sh.stderr(log).spawn().unwrap());
        let planted = PathBuf::from(format!("{}.{}.d", socket.display(), child.0.id()));
        let up = || {
            let exited = child.0.try_wait().unwrap();
            assert!(exited.is_none(), "{what}: the daemon exited ({exited:?})");
            UnixStream::connect(&socket).is_ok()
        };
        wait_until(Duration::from_secs(30), &format!("{what}: the socket"), up);
        assert!(ask(&socket, "ping").starts_with("ok "), "{what}");
        assert!(fs::symlink_metadata(&planted).is_ok(), "{what}: gone");
        let victim_s = fs::read_to_string(victim.join("s")).unwrap();
        assert_eq!(victim_s, "keep me\n");
        let s = fs::read_to_string(planted.join("s")).unwrap();
        assert_eq!(s, kept, "{what}");
    }
}
