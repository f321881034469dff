//! Figure 2: build-loop overhead. `nix-build` of N independent trivial
//! derivations in one call, with our hook (daemon signing and uploading to a
//! `file://` cache with its default compression, in the background), with
//! our hook and the daemon's worker held by a nix-delay-wrapper (the
//! hand-over alone, without the uploads' CPU), with `/bin/true` as the hook
//! (the floor: what Nix itself spends per hook run), with no hook, and with
//! the Nix manual's inline hook (`nix store sign` and `nix copy` inside the
//! hook). Same run, the order rotating every round; ratios are taken within
//! a round. The target is on the median ratio (2a), shown with its 95%
//! confidence interval so that a reader sees whether enough rounds ran.

use std::path::{Path, PathBuf};

use crate::common::{hook_bin, write_script, Daemon, NixEnv, NO_ENV};
use crate::stats::{Goal, Row, Samples};
use crate::util::{held_daemon, keep_until_the_end, Mode};

/// The Nix manual's example hook ("Using the post-build-hook"), with the
/// fallback Nix 2.8 needs for its empty `OUT_PATHS` (NixOS/nix#6446).
const INLINE_HOOK: &str = r#"#!/bin/sh
# The Nix manual's inline post-build-hook: sign and upload inside the hook.
set -eu
set -f # disable globbing
export IFS=' '
# Nix 2.8 leaves OUT_PATHS empty (NixOS/nix#6446): ask for the outputs.
if [ -z "${OUT_PATHS:-}" ]; then
    OUT_PATHS=$(nix-store --query --outputs "$DRV_PATH" | tr '\n' ' ')
fi
echo "Signing paths" $OUT_PATHS
nix store sign --key-file "$BENCH_KEY" $OUT_PATHS
echo "Uploading paths" $OUT_PATHS
exec nix copy --to "$BENCH_CACHE" $OUT_PATHS
"#;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    None,
    True,
    Ours,
    Inline,
    Held,
}

/// Runs the rounds and returns the rows of figure 2.
pub fn run(mode: &Mode) -> Vec<Row> {
    let env = NixEnv::new("bench-build");
    let (sk, pk) = env.gen_signing_key("bench-1");
    let cache = format!("file://{}", env.root().join("cache").display());
    let d = Daemon::start(
        &env,
        &[
            ("signing-key-file", &sk.display().to_string()),
            ("upload-to", &cache),
        ],
    );
    let held = held_daemon(&env, &sk);
    let inline_hook = env.root().join("inline-hook.sh");
    write_script(&inline_hook, INLINE_HOOK);
    let inline_env = [
        ("BENCH_KEY", sk.display().to_string()),
        (
            "BENCH_CACHE",
            format!("file://{}", env.root().join("cache-inline").display()),
        ),
    ];

    let n = mode.build_drvs;
    let [mut none, mut true_, mut ours, mut inline] = std::array::from_fn(|_| Samples::new());
    let [mut r_ours, mut r_inline, mut r_held, mut per_hook] =
        std::array::from_fn(|_| Samples::new());
    let mut uploaded: Vec<PathBuf> = Vec::new();
    let order = [Hook::None, Hook::True, Hook::Ours, Hook::Inline, Hook::Held];
    for round in 0..mode.build_rounds {
        let mut took = [0.0f64; 5];
        for j in 0..order.len() {
            let which = order[(round + j) % order.len()];
            if which == Hook::Inline && round >= mode.inline_rounds {
                continue;
            }
            let tag = format!("r{round}-{}", which as u8);
            let b = match which {
                Hook::None => env.build(n, &tag, None, NO_ENV),
                Hook::True => env.build(n, &tag, Some(Path::new("/bin/true")), NO_ENV),
                Hook::Ours => env.build(n, &tag, Some(&hook_bin()), &d.hook_env()),
                Hook::Inline => env.build(n, &tag, Some(&inline_hook), &inline_env),
                Hook::Held => env.build(n, &tag, Some(&hook_bin()), &held.hook_env()),
            };
            b.assert_success();
            assert_eq!(b.out_paths.len(), n, "nix-build printed {:?}", b.out_paths);
            if which == Hook::Ours || which == Hook::Held {
                let said = b.hook_lines();
                assert!(said.is_empty(), "our hook did not hand over: {said:?}");
            }
            if which == Hook::Ours {
                // Let the background upload finish before the next build,
                // so it only overlaps the build that produced its paths.
                let reply = d.request_lines("wait");
                assert_eq!(reply.last().map(String::as_str), Some("ok all uploaded"));
                uploaded.extend(b.out_paths.iter().cloned());
            }
            took[which as usize] = b.elapsed.as_secs_f64() * 1000.0;
        }
        none.push(took[0]);
        true_.push(took[1]);
        ours.push(took[2]);
        r_ours.push(took[2] / took[1]);
        if round < mode.inline_rounds {
            inline.push(took[3]);
            r_inline.push(took[3] / took[1]);
        }
        r_held.push(took[4] / took[1]);
        per_hook.push((took[1] - took[0]) / n as f64);
    }
    // Correctness: everything our hook handed over is in the cache, signed.
    env.verify_in_cache(&cache, &pk, &uploaded)
        .unwrap_or_else(|e| panic!("our uploads are not in the cache: {e}\n{}", d.log()));

    keep_until_the_end(env);
    vec![
        Row::from_samples_ci(
            &format!("2a nix-build of {n} drvs, our hook / /bin/true hook"),
            &r_ours,
            "x",
            Goal::AtMost(1.10),
        )
        .note(format!(
            "{:.0} ms vs {:.0} ms; daemon signs and uploads (xz) meanwhile",
            ours.median(),
            true_.median()
        )),
        Row::from_samples_ci(
            &format!("2b nix-build of {n} drvs, our hook, worker held / /bin/true hook"),
            &r_held,
            "x",
            Goal::Info,
        )
        .note("no uploads during the build: the hand-over alone"),
        Row::from_samples(
            &format!("2c nix-build of {n} drvs, manual's inline sign+copy hook / /bin/true hook"),
            &r_inline,
            "x",
            Goal::Info,
        )
        .note(format!(
            "{:.0} ms: what the daemon saves the build loop",
            inline.median()
        )),
        Row::from_samples(
            "2d Nix's own cost per hook run (/bin/true vs no hook)",
            &per_hook,
            "ms",
            Goal::Info,
        )
        .note(format!("no hook: {:.0} ms per build", none.median())),
    ]
}
