//! The `.narinfo` files of Nix's binary cache protocol: `Key: value` lines
//! naming a store path, where its NAR is and what it is.
use super::hash::{ContentAddress, HashError, NixHash};
use super::path_info_json::NixPathInfo;
use super::store_path::{StorePath, StorePathError};

#[derive(Debug, thiserror::Error)]
pub enum NarInfoError {
    #[error("line {0:?} is not `Key: value`")]
    Line(String),
    #[error("no {0} line")]
    Missing(&'static str),
    #[error("{field}: {value:?}: {reason}")]
    Path {
        field: &'static str,
        value: String,
        reason: StorePathError,
    },
    #[error("{field}: {reason}")]
    Hash {
        field: &'static str,
        reason: HashError,
    },
    #[error("NarSize: {0:?} is not a number")]
    Size(String),
    #[error("Sig: {0:?} is not NAME:BASE64")]
    Sig(String),
    #[error("line {0:?} holds a control character")]
    Control(String),
}

/// What a narinfo says about its store path, and where its NAR file is.
#[derive(Debug, Clone)]
pub struct NarInfo {
    pub info: NixPathInfo,
    pub url: String,
    pub compression: String,
    /// Signatures as written (`name:base64`).
    pub sigs: Vec<String>,
}

impl NarInfo {
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let (mut path, mut url, mut compression) = (None, None, None);
        let (mut nar_hash, mut nar_size) = (None, None);
        let (mut references, mut deriver, mut ca, mut sigs) = (Vec::new(), None, None, Vec::new());
        let store_path = |field, v: &str| {
            let r = if v.starts_with('/') {
                StorePath::from_absolute_path(v)
            } else {
                StorePath::from_basename(v)
            };
            r.map_err(|reason| NarInfoError::Path {
                field,
                value: v.into(),
                reason,
            })
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            // a value ending in "\r" would come back without it once
            // written out: no line carries a control character
            if line.chars().any(char::is_control) {
                return Err(NarInfoError::Control(line.into()));
            }
            let (k, v) = line
                .split_once(": ")
                .ok_or_else(|| NarInfoError::Line(line.into()))?;
            match k {
                "StorePath" => path = Some(store_path("StorePath", v)?),
                "URL" => url = Some(v.to_string()),
                "Compression" => compression = Some(v.to_string()),
                "NarHash" => {
                    nar_hash = Some(NixHash::parse(v).map_err(|reason| NarInfoError::Hash {
                        field: "NarHash",
                        reason,
                    })?)
                }
                "NarSize" => nar_size = Some(v.parse().map_err(|_| NarInfoError::Size(v.into()))?),
                "References" => {
                    for r in v.split_whitespace() {
                        references.push(store_path("References", r)?);
                    }
                }
                "Deriver" if v != "unknown-deriver" => deriver = Some(store_path("Deriver", v)?),
                "Sig" => {
                    if !v.contains(':') {
                        return Err(NarInfoError::Sig(v.into()));
                    }
                    sigs.push(v.to_string());
                }
                "CA" => {
                    ca = Some(
                        ContentAddress::parse(v).map_err(|reason| NarInfoError::Hash {
                            field: "CA",
                            reason,
                        })?,
                    )
                }
                _ => {} // FileHash, FileSize, System...: not needed
            }
        }
        let signatures = sigs
            .iter()
            .filter_map(|s| {
                let (n, b) = s.split_once(':')?;
                Some((
                    n.to_string(),
                    data_encoding::BASE64.decode(b.as_bytes()).ok()?,
                ))
            })
            .collect();
        Ok(NarInfo {
            info: NixPathInfo {
                path: path.ok_or(NarInfoError::Missing("StorePath"))?,
                nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
                nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
                references,
                deriver,
                ca,
                signatures,
            },
            url: url.ok_or(NarInfoError::Missing("URL"))?,
            // as Nix reads it: no Compression line means bzip2
            compression: compression.unwrap_or_else(|| "bzip2".into()),
            sigs,
        })
    }

    pub fn render(&self) -> String {
        let i = &self.info;
        let mut refs: Vec<String> = i.references.iter().map(|r| r.to_basename()).collect();
        refs.sort();
        let mut out = format!(
            "StorePath: {}\nURL: {}\nCompression: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
            i.path.to_absolute_path(),
            self.url,
            self.compression,
            i.nar_hash.to_nix32(),
            i.nar_size,
            refs.join(" ")
        );
        if let Some(d) = &i.deriver {
            out.push_str(&format!("Deriver: {}\n", d.to_basename()));
        }
        for s in &self.sigs {
            out.push_str(&format!("Sig: {s}\n"));
        }
        if let Some(ca) = &i.ca {
            out.push_str(&format!("CA: {ca}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_renders() {
        let text = format!(
            "StorePath: /nix/store/{h}-hello\nURL: nar/abc.nar.xz\nCompression: xz\n\
             FileHash: sha256:{z}\nFileSize: 10\nNarHash: sha256:{z}\nNarSize: 120\n\
             References: {h}-hello {g}-glibc\nDeriver: {h}-hello.drv\nSig: k-1:AAAA\n",
            h = "1".repeat(32),
            g = "2".repeat(32),
            z = "0".repeat(52)
        );
        let n = NarInfo::parse(&text).unwrap();
        assert_eq!(n.info.nar_size, 120);
        assert_eq!(n.info.references.len(), 2);
        assert_eq!(n.compression, "xz");
        assert_eq!(n.sigs, vec!["k-1:AAAA".to_string()]);
        let again = NarInfo::parse(&n.render()).unwrap();
        assert_eq!(again.info, n.info);
        assert!(NarInfo::parse("StorePath /x").is_err());
        assert!(matches!(
            NarInfo::parse("URL: x\n"),
            Err(NarInfoError::Missing(_))
        ));
    }

    #[test]
    fn a_value_with_a_control_character_is_refused() {
        let text = format!(
            "StorePath: /nix/store/{h}-hello\nURL: nar/x.nar\nNarHash: sha256:{z}\n\
             NarSize: 120\nSig: k-1:AAAA\n",
            h = "1".repeat(32),
            z = "0".repeat(52)
        );
        let bare_cr = format!("{}\r", text.trim_end());
        assert!(matches!(
            NarInfo::parse(&bare_cr),
            Err(NarInfoError::Control(_))
        ));
        // CRLF line ends are line ends
        assert!(NarInfo::parse(&text.replace('\n', "\r\n")).is_ok());
    }
}
