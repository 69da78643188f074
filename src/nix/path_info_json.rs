//! Parser for `nix path-info --json --recursive`. Older Nix (e.g. 2.8) prints a
//! list of objects carrying `"path"`; newer Nix prints an object keyed by
//! path whose values lack `"path"` (and are `null` for invalid paths).

use data_encoding::BASE64;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use super::hash::{ContentAddress, HashError, NixHash};
use super::store_path::{StorePath, StorePathError};

/// Metadata of one store path, as needed to import it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixPathInfo {
    pub path: StorePath,
    pub nar_hash: NixHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub ca: Option<ContentAddress>,
    /// `(key name, signature bytes)`, from `name:base64` strings.
    pub signatures: Vec<(String, Vec<u8>)>,
}

/// What went wrong, naming the store path (as printed) and field.
#[derive(Debug, Error)]
pub enum PathInfoJsonError {
    #[error("path-info JSON is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("path-info JSON is neither a list nor an object")]
    UnexpectedShape,
    #[error("path-info list entry {index} has no string \"path\"")]
    MissingPath { index: usize },
    #[error("{path}: not a valid store path: {reason}")]
    InvalidPath {
        path: String,
        reason: StorePathError,
    },
    #[error("{path}: path is not valid in the Nix store")]
    NotValid { path: String },
    #[error("{path}: malformed entry: {reason}")]
    Entry {
        path: String,
        reason: serde_json::Error,
    },
    #[error("{path}: field {field}: {reason}")]
    Hash {
        path: String,
        field: &'static str,
        reason: HashError,
    },
    #[error("{path}: field {field}: {value:?}: {reason}")]
    StorePathField {
        path: String,
        field: &'static str,
        value: String,
        reason: StorePathError,
    },
    #[error("{path}: malformed signature {signature:?}")]
    Signature { path: String, signature: String },
}

/// The fields read from one entry; everything else is ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPathInfo {
    nar_hash: String,
    nar_size: u64,
    references: Vec<String>,
    #[serde(default)]
    deriver: Option<String>,
    #[serde(default)]
    ca: Option<String>,
    #[serde(default)]
    signatures: Option<Vec<String>>,
}

/// Parses either shape of `nix path-info --json` output, in document order
/// for lists and in the JSON map's key order for objects.
pub fn parse_path_info_json(bytes: &[u8]) -> Result<Vec<NixPathInfo>, PathInfoJsonError> {
    match serde_json::from_slice(bytes).map_err(PathInfoJsonError::Json)? {
        Value::Array(entries) => entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let path = entry
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or(PathInfoJsonError::MissingPath { index })?
                    .to_owned();
                convert(path, entry)
            })
            .collect(),
        Value::Object(map) => map
            .into_iter()
            .map(|(path, entry)| convert(path, entry))
            .collect(),
        _ => Err(PathInfoJsonError::UnexpectedShape),
    }
}

fn convert(path: String, entry: Value) -> Result<NixPathInfo, PathInfoJsonError> {
    let store_path = match StorePath::from_absolute_path(&path) {
        Ok(p) => p,
        Err(source) => {
            return Err(PathInfoJsonError::InvalidPath {
                path,
                reason: source,
            })
        }
    };
    // New Nix: `null`; Nix 2.8: `{"path": ..., "valid": false}`.
    if entry.is_null() || entry.get("valid") == Some(&Value::Bool(false)) {
        return Err(PathInfoJsonError::NotValid { path });
    }
    let raw: RawPathInfo = match serde_json::from_value(entry) {
        Ok(raw) => raw,
        Err(source) => {
            return Err(PathInfoJsonError::Entry {
                path,
                reason: source,
            })
        }
    };
    let hash_err = |field, source| PathInfoJsonError::Hash {
        path: path.clone(),
        field,
        reason: source,
    };
    let sp = |field, value: String| {
        StorePath::from_absolute_path(&value).map_err(|source| PathInfoJsonError::StorePathField {
            path: path.clone(),
            field,
            value,
            reason: source,
        })
    };
    let nar_hash = NixHash::parse(&raw.nar_hash).map_err(|e| hash_err("narHash", e))?;
    let references = raw
        .references
        .into_iter()
        .map(|r| sp("references", r))
        .collect::<Result<_, _>>()?;
    let deriver = raw.deriver.map(|d| sp("deriver", d)).transpose()?;
    let ca = raw
        .ca
        .map(|c| ContentAddress::parse(&c).map_err(|e| hash_err("ca", e)))
        .transpose()?;
    let signatures = raw
        .signatures
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            parse_signature(&s).ok_or_else(|| PathInfoJsonError::Signature {
                path: path.clone(),
                signature: s,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(NixPathInfo {
        path: store_path,
        nar_hash,
        nar_size: raw.nar_size,
        references,
        deriver,
        ca,
        signatures,
    })
}

/// Splits `keyname:base64`; the key name is never empty.
fn parse_signature(s: &str) -> Option<(String, Vec<u8>)> {
    let (name, data) = s.split_once(':')?;
    if name.is_empty() {
        return None;
    }
    Some((name.to_owned(), BASE64.decode(data.as_bytes()).ok()?))
}

#[cfg(test)]
mod tests {
    use super::super::hash::CaMethod;
    use super::*;

    const HELLO: &str = "/nix/store/7y4xfyqbm2vhyhsszf4fyzp2z3k4f6zf-hello-2.12.1";
    const GLIBC: &str = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-glibc-2.39-52";
    const DRV: &str = "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-hello-2.12.1.drv";
    const NIX32: &str = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const SRI: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
    const SIG: &str = "cache.nixos.org-1:AAECAw==";

    #[test]
    fn parses_old_list_shape() {
        let json = format!(
            r#"[{{"path":"{HELLO}","narHash":"{NIX32}","narSize":120,
                 "references":["{GLIBC}","{HELLO}"],"deriver":"{DRV}",
                 "registrationTime":1,"valid":true,"signatures":["{SIG}"]}},
                {{"path":"{GLIBC}","narHash":"{NIX32}","narSize":8,"references":[],
                  "ca":"fixed:r:{NIX32}","registrationTime":1,"valid":true}}]"#
        );
        let infos = parse_path_info_json(json.as_bytes()).unwrap();
        assert_eq!(infos.len(), 2);
        let hello = &infos[0];
        assert_eq!(hello.path.to_string(), HELLO);
        assert_eq!(hello.nar_hash.to_sri(), SRI);
        assert_eq!(hello.nar_size, 120);
        let refs: Vec<String> = hello.references.iter().map(|r| r.to_string()).collect();
        assert_eq!(refs, [GLIBC, HELLO]);
        assert_eq!(hello.deriver.as_ref().unwrap().name(), "hello-2.12.1.drv");
        assert_eq!(hello.ca, None);
        assert_eq!(
            hello.signatures,
            [("cache.nixos.org-1".to_owned(), vec![0, 1, 2, 3])]
        );
        let glibc = &infos[1];
        assert_eq!(glibc.deriver, None);
        assert!(glibc.signatures.is_empty());
        assert_eq!(glibc.ca.as_ref().unwrap().method(), CaMethod::NarRecursive);
    }

    #[test]
    fn parses_new_object_shape() {
        let json = format!(
            r#"{{"{HELLO}":{{"narHash":"{SRI}","narSize":120,"references":["{GLIBC}"],
                 "deriver":null,"ca":null,"signatures":[],"registrationTime":1,
                 "ultimate":false,"closureSize":5}},
                "{GLIBC}":{{"narHash":"{SRI}","narSize":8,"references":[],
                 "deriver":"{DRV}","ca":"text:{NIX32}","signatures":["{SIG}"]}}}}"#
        );
        let mut infos = parse_path_info_json(json.as_bytes()).unwrap();
        infos.sort_by_key(|i| i.path.to_string());
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].path.to_string(), GLIBC);
        assert_eq!(infos[0].ca.as_ref().unwrap().method(), CaMethod::Text);
        assert_eq!(infos[0].signatures.len(), 1);
        assert_eq!(infos[1].path.to_string(), HELLO);
        assert_eq!(infos[1].deriver, None);
        assert_eq!(infos[1].nar_hash.to_nix32(), NIX32);
        assert_eq!(infos[1].references[0].to_string(), GLIBC);
    }

    fn err(json: &str) -> String {
        parse_path_info_json(json.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_path_and_field() {
        let e = err(&format!(r#"{{"{HELLO}":null}}"#));
        assert!(e.contains(HELLO) && e.contains("not valid"), "{e}");
        let e = err(&format!(r#"[{{"path":"{HELLO}","valid":false}}]"#));
        assert!(e.contains(HELLO) && e.contains("not valid"), "{e}");
        let e = err(&format!(r#"{{"{HELLO}":{{"narSize":1,"references":[]}}}}"#));
        assert!(e.contains(HELLO) && e.contains("narHash"), "{e}");
        let e = err(&format!(
            r#"{{"{HELLO}":{{"narHash":"sha256:xyz","narSize":1,"references":[]}}}}"#
        ));
        assert!(e.contains(HELLO) && e.contains("narHash"), "{e}");
        let e = err(&format!(
            r#"{{"{HELLO}":{{"narHash":"{SRI}","narSize":1,"references":["/tmp/x"]}}}}"#
        ));
        assert!(e.contains(HELLO) && e.contains("references") && e.contains("/tmp/x"));
        let e = err(&format!(
            r#"{{"{HELLO}":{{"narHash":"{SRI}","narSize":1,"references":[],"signatures":["nocolon"]}}}}"#
        ));
        assert!(e.contains(HELLO) && e.contains("nocolon"), "{e}");
        let e = err(&format!(
            r#"{{"{HELLO}":{{"narHash":"{SRI}","narSize":1,"references":[],"ca":"bogus"}}}}"#
        ));
        assert!(e.contains(HELLO) && e.contains("ca"), "{e}");
        let e = err(r#"{"/nix/store/short-x":{}}"#);
        assert!(e.contains("/nix/store/short-x"), "{e}");
    }

    #[test]
    fn rejects_bad_documents() {
        assert!(matches!(
            parse_path_info_json(b"not json"),
            Err(PathInfoJsonError::Json(_))
        ));
        assert!(matches!(
            parse_path_info_json(b"42"),
            Err(PathInfoJsonError::UnexpectedShape)
        ));
        assert!(matches!(
            parse_path_info_json(br#"[{"narHash":"x"}]"#),
            Err(PathInfoJsonError::MissingPath { index: 0 })
        ));
        assert!(parse_path_info_json(b"[]").unwrap().is_empty());
        assert!(parse_path_info_json(b"{}").unwrap().is_empty());
    }
}
