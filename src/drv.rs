//! A derivation's output paths from the start of its `.drv` file (an ATerm,
//! `Derive([("out","/nix/store/...-name","",""),...],...)`), which costs no
//! process; Nix before 2.18 gives the hook a derivation, not `OUT_PATHS`.

use std::io::Read;

use crate::store_path::StorePath;

/// Reads the outputs of the derivation at `drv`; `None` when the file's start names none
/// (content-addressed, or a list too long to fit: left to nix-store).
pub fn read_outputs(drv: &StorePath, store_dir: &str) -> std::io::Result<Option<Vec<StorePath>>> {
    let mut head = Vec::with_capacity(16 * 1024);
    let file = std::fs::File::open(drv)?;
    file.take(256 * 1024).read_to_end(&mut head)?;
    Ok(parse_outputs(&String::from_utf8_lossy(&head), store_dir))
}

/// Parses the output list at the start of a derivation's ATerm text.
pub fn parse_outputs(text: &str, store_dir: &str) -> Option<Vec<StorePath>> {
    let (list, _) = text.strip_prefix("Derive([(\"")?.split_once("\")]")?;
    // Each output is ("name","path","hashAlgo","hash"), without quotes inside.
    let output = |tuple: &str| match tuple.split("\",\"").collect::<Vec<_>>()[..] {
        [_, path, _, _] => StorePath::parse_output(path, store_dir).ok(),
        _ => None,
    };
    list.split("\"),(\"").map(output).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "/nix/store";
    const H: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    #[test]
    fn reads_every_output() {
        let text = format!(
            "Derive([(\"dev\",\"{S}/{H}-x-dev\",\"\",\"\"),(\"out\",\"{S}/{H}-x\",\"\",\"\")],[],[],\"x86_64-linux\",\"/bin/sh\",[],[])"
        );
        let outs = parse_outputs(&text, S).unwrap();
        assert_eq!(
            outs.iter()
                .map(|p| p.as_str().to_string())
                .collect::<Vec<_>>(),
            vec![format!("{S}/{H}-x-dev"), format!("{S}/{H}-x")]
        );
    }

    #[test]
    fn fixed_output_fields_are_skipped() {
        let text = format!("Derive([(\"out\",\"{S}/{H}-src\",\"sha256\",\"abc\")],[])");
        assert_eq!(parse_outputs(&text, S).unwrap().len(), 1);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for text in [
            "",
            "Derive([",
            "Derive([(\"out\",\"\",\"\",\"\")],[])",
            "Derive([(\"out\",\"/nix/store/x\",\"\",\"\")],[])",
            "Derive([(\"out\",\"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a\",\"\",\"\")x",
            "rm -rf /",
        ] {
            assert!(parse_outputs(text, S).is_none(), "{text}");
        }
    }
}
