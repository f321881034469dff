//! Reading a derivation's output paths from its `.drv` file.
//!
//! Nix 2.8 runs the hook with an empty `OUT_PATHS`, so the hook sends the
//! derivation instead and the daemon finds the outputs. A `.drv` file is an
//! ATerm that starts with the list of outputs:
//! `Derive([("out","/nix/store/...-name","",""),...],...)`; reading that list
//! directly costs no process. Derivations whose output paths are not in the
//! file (content-addressed ones) are left to `nix-store --query --outputs`.

use std::io::Read;

use crate::store_path::StorePath;

/// Why the outputs could not be read from the file.
#[derive(Debug)]
pub enum DrvError {
    /// The file could not be read (gone after garbage collection, say).
    Io(std::io::Error),
    /// The file is not in the expected format, or names no valid output.
    Format,
}

/// Reads the output paths of the derivation at `drv`: from the start of
/// the file (a list of outputs that does not fit is left to nix-store).
pub fn read_outputs(drv: &StorePath, store_dir: &str) -> Result<Vec<StorePath>, DrvError> {
    let mut head = Vec::with_capacity(16 * 1024);
    let file = std::fs::File::open(drv).map_err(DrvError::Io)?;
    file.take(256 * 1024)
        .read_to_end(&mut head)
        .map_err(DrvError::Io)?;
    parse_outputs(&String::from_utf8_lossy(&head), store_dir)
}

/// Parses the output list at the start of a derivation's ATerm text.
pub fn parse_outputs(text: &str, store_dir: &str) -> Result<Vec<StorePath>, DrvError> {
    let mut rest = text.strip_prefix("Derive([").ok_or(DrvError::Format)?;
    let mut outputs = Vec::new();
    loop {
        // Each output is ("name","path","hashAlgo","hash"), without quotes inside.
        let tuple = rest.strip_prefix("(\"").and_then(|r| r.split_once("\")"));
        let (tuple, after) = tuple.ok_or(DrvError::Format)?;
        match tuple.split("\",\"").collect::<Vec<_>>()[..] {
            [_, path, _, _] if !path.is_empty() => outputs
                .push(StorePath::parse_output(path, store_dir).map_err(|_| DrvError::Format)?),
            _ => return Err(DrvError::Format),
        }
        match after.as_bytes().first() {
            Some(b',') => rest = &after[1..],
            Some(b']') => return Ok(outputs),
            _ => return Err(DrvError::Format),
        }
    }
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
            assert!(parse_outputs(text, S).is_err(), "{text}");
        }
    }
}
