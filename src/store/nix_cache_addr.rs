//! The address of a Nix binary cache used as an upstream:
//! `nix+http://HOST[:PORT][/PATH]`, `nix+https://...`, `nix+file:///DIR`
//! and `nix+s3://BUCKET[/PREFIX]?endpoint=URL&region=R`, each with
//! `trusted-public-keys=NAME:KEY,...` (the keys whose signatures make a
//! narinfo trusted), `check-signatures=false` (the operator's explicit
//! choice to trust the cache without them) and `negative-ttl=SECONDS`.
//! Parsed here, in the store layer, so that every command names it alike;
//! it is opened by `crate::ingest::nix_cache`, which reads NARs.
use crate::store::bucket::BucketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the cache's files are.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NixCacheLocation {
    /// `http://...` or `https://...`, without a trailing slash.
    Http(String),
    /// An absolute directory.
    File(PathBuf),
    S3(BucketAddr),
}

/// A Nix binary cache and how far it is trusted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NixCacheAddr {
    pub location: NixCacheLocation,
    /// Public keys as Nix writes them (`name:base64`), not yet parsed
    /// (none here and none on the command line, with checking on, is
    /// refused when the cache is opened).
    pub trusted_public_keys: Vec<String>,
    /// `false` only when the address says `check-signatures=false`.
    pub check_signatures: bool,
    /// How long the cache's "no such path" is believed.
    pub negative_ttl: Duration,
}

/// Default `negative-ttl`: short, as CI pushes new paths all the time (Nix
/// itself believes a miss for an hour).
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// Largest `negative-ttl` accepted: a day.
const MAX_NEGATIVE_TTL: u64 = 86_400;

/// Decodes `%XX` escapes (a key's base64 may carry `+`, `/` and `=`,
/// written raw or escaped); `+` stays `+`.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{s:?}: a '%' is not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl NixCacheAddr {
    /// From what follows `nix+` (`http://...`, `https://...`, `file:///DIR`,
    /// `s3://...`), query included.
    pub fn parse(rest: &str) -> Result<Self, String> {
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut keys = Vec::new();
        let mut check = true;
        let mut ttl = DEFAULT_NEGATIVE_TTL;
        // what the bucket's own parser reads
        let mut passed_on = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("trusted-public-keys", v)) => {
                    for k in percent_decode(v)?
                        .split([',', ' '])
                        .filter(|k| !k.is_empty())
                    {
                        keys.push(k.to_string());
                    }
                }
                Some(("check-signatures", "false")) => check = false,
                Some(("check-signatures", "true")) => check = true,
                Some(("check-signatures", v)) => {
                    return Err(format!("check-signatures={v}: true or false"))
                }
                Some(("negative-ttl", v)) => {
                    let secs = v
                        .parse::<u64>()
                        .ok()
                        .filter(|s| *s <= MAX_NEGATIVE_TTL)
                        .ok_or_else(|| {
                            format!("negative-ttl={v}: seconds, 0 to {MAX_NEGATIVE_TTL}")
                        })?;
                    ttl = Duration::from_secs(secs);
                }
                _ if base.starts_with("s3://") => passed_on.push(pair),
                _ => {
                    return Err(format!(
                        "unknown parameter {pair:?} (trusted-public-keys=NAME:KEY,..., \
                         check-signatures=false, negative-ttl=SECONDS)"
                    ))
                }
            }
        }
        let location = if let Some(b) = base.strip_prefix("s3://") {
            let q = passed_on.join("&");
            let b = if q.is_empty() {
                b.to_string()
            } else {
                format!("{b}?{q}")
            };
            NixCacheLocation::S3(BucketAddr::parse(&b)?)
        } else if let Some(p) = base.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(
                    "nix+file:// needs an absolute directory, as in nix+file:///srv/cache".into(),
                );
            }
            NixCacheLocation::File(PathBuf::from(p.trim_end_matches('/')))
        } else if base.starts_with("http://") || base.starts_with("https://") {
            let url = base.trim_end_matches('/');
            let host = url.split_once("://").map_or("", |(_, r)| r);
            if host.is_empty() || host.starts_with('/') || url.bytes().any(|c| c.is_ascii_control())
            {
                return Err(format!("{url:?} names no host"));
            }
            NixCacheLocation::Http(url.to_string())
        } else {
            return Err(
                "a Nix binary cache is nix+http://, nix+https://, nix+file:///DIR or nix+s3://BUCKET"
                    .into(),
            );
        };
        Ok(Self {
            location,
            trusted_public_keys: keys,
            check_signatures: check,
            negative_ttl: ttl,
        })
    }

    /// The address for logs: without its parameters, and without a user
    /// or password an http(s) URL may carry.
    pub fn shown(&self) -> String {
        let s = self.to_string();
        let s = s.split('?').next().unwrap_or_default();
        match s.split_once("://") {
            Some((scheme, rest)) if matches!(self.location, NixCacheLocation::Http(_)) => {
                let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
                format!("{scheme}://{host}{path}")
            }
            _ => s.to_string(),
        }
    }

    /// `host:port` the cache is reached at, for the sandbox.
    pub fn endpoint_host(&self) -> Option<String> {
        match &self.location {
            NixCacheLocation::Http(u) => BucketAddr {
                bucket: String::new(),
                prefix: String::new(),
                endpoint: Some(u.clone()),
                region: None,
            }
            .endpoint_host(),
            NixCacheLocation::S3(b) => b.endpoint_host(),
            NixCacheLocation::File(_) => None,
        }
    }
}

/// As the command line writes it.
impl std::fmt::Display for NixCacheAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut q = Vec::new();
        if !self.trusted_public_keys.is_empty() {
            q.push(format!(
                "trusted-public-keys={}",
                self.trusted_public_keys.join(",")
            ));
        }
        if !self.check_signatures {
            q.push("check-signatures=false".into());
        }
        if self.negative_ttl != DEFAULT_NEGATIVE_TTL {
            q.push(format!("negative-ttl={}", self.negative_ttl.as_secs()));
        }
        let base = match &self.location {
            NixCacheLocation::Http(u) => format!("nix+{u}"),
            NixCacheLocation::File(p) => format!("nix+file://{}", p.display()),
            NixCacheLocation::S3(b) => {
                let s = format!("nix+{b}");
                // the bucket's own parameters come first
                if let Some((b, bq)) = s.split_once('?') {
                    q.insert(0, bq.to_string());
                    b.to_string()
                } else {
                    s
                }
            }
        };
        if q.is_empty() {
            write!(f, "{base}")
        } else {
            write!(f, "{base}?{}", q.join("&"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "cache-1:5Gw5Z2Y0rJ3yQk2c6p2tq3bq9s0m7Q8d0x2k3l4m5n6=";

    #[test]
    fn parses_nix_cache_addresses() {
        let a =
            NixCacheAddr::parse(&format!("http://h:8080/c/?trusted-public-keys={KEY}")).unwrap();
        assert_eq!(a.location, NixCacheLocation::Http("http://h:8080/c".into()));
        assert_eq!(a.trusted_public_keys, vec![KEY.to_string()]);
        assert!(a.check_signatures);
        assert_eq!(a.endpoint_host().as_deref(), Some("h:8080"));
        assert_eq!(a.shown(), "nix+http://h:8080/c");
        let a = NixCacheAddr::parse("https://u:secret@h/c?check-signatures=false").unwrap();
        assert_eq!(a.shown(), "nix+https://h/c");
        // escaped, and two keys
        let esc = KEY.replace('=', "%3D").replace(':', "%3A");
        let a =
            NixCacheAddr::parse(&format!("file:///srv/c?trusted-public-keys={esc},b:x")).unwrap();
        assert_eq!(a.location, NixCacheLocation::File("/srv/c".into()));
        assert_eq!(a.trusted_public_keys, vec![KEY.to_string(), "b:x".into()]);
        let a =
            NixCacheAddr::parse("https://cache.example.org?check-signatures=false&negative-ttl=5")
                .unwrap();
        assert!(!a.check_signatures && a.negative_ttl == Duration::from_secs(5));
        assert_eq!(a.endpoint_host().as_deref(), Some("cache.example.org:443"));
        let s3 = format!(
            "s3://cache/p?endpoint=http://127.0.0.1:3900&region=garage&trusted-public-keys={KEY}"
        );
        let a = NixCacheAddr::parse(&s3).unwrap();
        assert!(
            matches!(&a.location, NixCacheLocation::S3(b) if b.bucket == "cache" && b.prefix == "p")
        );
        assert_eq!(a.to_string(), format!("nix+{s3}"));
        assert_eq!(
            NixCacheAddr::parse(a.to_string().strip_prefix("nix+").unwrap()).unwrap(),
            a
        );
        for bad in [
            "file://rel?check-signatures=false",               // relative
            "http://?check-signatures=false",                  // no host
            "ftp://h?check-signatures=false",                  // scheme
            "http://h?check-signatures=maybe",                 // value
            "http://h?check-signatures=false&negative-ttl=-1", // ttl
            "http://h?check-signatures=false&other=1",         // unknown
            "http://h?trusted-public-keys=%zz",                // escape
        ] {
            assert!(NixCacheAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
