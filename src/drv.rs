//! Reading a derivation's output paths from its `.drv` file.
//!
//! Nix 2.8 runs the hook with an empty `OUT_PATHS`, so the hook sends the
//! derivation instead and the daemon finds the outputs. A `.drv` file is an
//! ATerm that starts with the list of outputs:
//! `Derive([("out","/nix/store/...-name","",""),...],...)`; reading that list
//! directly costs no process. Derivations whose output paths are not in the
//! file (content-addressed ones) are left to `nix-store --query --outputs`.

use std::io::Read;

use crate::store_path::{PathError, StorePath};

/// Why the outputs could not be read from the file.
#[derive(Debug)]
pub enum DrvError {
    /// The file could not be read (gone after garbage collection, say).
    Io(std::io::Error),
    /// The file is not in the expected format, or names no fixed outputs.
    Format,
    /// An output path failed validation.
    Path(PathError),
}

impl std::fmt::Display for DrvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrvError::Io(e) => write!(f, "cannot read derivation: {e}"),
            DrvError::Format => write!(f, "derivation lists no output paths"),
            DrvError::Path(e) => write!(f, "derivation output: {e}"),
        }
    }
}

/// Reads the output paths of the derivation at `drv`.
pub fn read_outputs(drv: &StorePath, store_dir: &str) -> Result<Vec<StorePath>, DrvError> {
    // The outputs come first; a derivation with very many outputs is rare,
    // and one whose list does not fit is left to nix-store.
    let mut head = Vec::with_capacity(16 * 1024);
    std::fs::File::open(drv)
        .and_then(|f| f.take(256 * 1024).read_to_end(&mut head))
        .map_err(DrvError::Io)?;
    let text = String::from_utf8_lossy(&head);
    parse_outputs(&text, store_dir)
}

/// Parses the output list at the start of a derivation's ATerm text.
pub fn parse_outputs(text: &str, store_dir: &str) -> Result<Vec<StorePath>, DrvError> {
    let mut rest = text.strip_prefix("Derive([").ok_or(DrvError::Format)?;
    let mut outputs = Vec::new();
    loop {
        // Each output is ("name","path","hashAlgo","hash"); none of these
        // strings contains a quote.
        rest = rest.strip_prefix("(\"").ok_or(DrvError::Format)?;
        let mut fields = Vec::with_capacity(4);
        for i in 0..4 {
            let end = rest.find('"').ok_or(DrvError::Format)?;
            fields.push(&rest[..end]);
            rest = &rest[end + 1..];
            let sep = if i < 3 { ",\"" } else { ")" };
            rest = rest.strip_prefix(sep).ok_or(DrvError::Format)?;
        }
        if fields[1].is_empty() {
            return Err(DrvError::Format);
        }
        outputs.push(StorePath::parse_output(fields[1], store_dir).map_err(DrvError::Path)?);
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if rest.starts_with(']') {
            return Ok(outputs);
        } else {
            return Err(DrvError::Format);
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
