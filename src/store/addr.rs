//! Store addresses, as the command line writes them: `memory://`,
//! `local:///PATH`, `grpc+unix:///PATH`, `grpc+http://HOST:PORT`. Each
//! names a backend; [`crate::store::open`] maps it to one.
use crate::store::bucket::BucketAddr;
use crate::store::channel::Wire;
use crate::store::error::{Error, Result};
use std::path::PathBuf;

/// A parsed store address. A gRPC one may pin the wire family
/// (`?wire=tvix` or `?wire=snix`); by default it is found out.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Addr {
    Memory,
    Local(PathBuf),
    GrpcUnix(PathBuf, Wire),
    GrpcHttp(String, Wire),
    /// An S3-compatible bucket (`s3://BUCKET[/PREFIX]?endpoint=URL&region=R`).
    S3(BucketAddr),
}

/// As it is written on the command line.
impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Memory => write!(f, "memory://"),
            Addr::Local(p) => write!(f, "local://{}", p.display()),
            Addr::GrpcUnix(p, w) => write!(f, "grpc+unix://{}{}", p.display(), w.query()),
            Addr::GrpcHttp(h, w) => write!(f, "grpc+http://{h}{}", w.query()),
            Addr::S3(b) => write!(f, "{b}"),
        }
    }
}

impl std::str::FromStr for Addr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::InvalidAddress(s.into(), why.into());
        let abs = |p: &str| -> Result<PathBuf> {
            if p.starts_with('/') {
                Ok(PathBuf::from(p))
            } else {
                Err(bad("needs an absolute path, as in local:///var/lib/store"))
            }
        };
        if let Some(rest) = s.strip_prefix("s3://") {
            return BucketAddr::parse(rest)
                .map(Addr::S3)
                .map_err(|why| bad(&why));
        }
        let (s, wire) = match s.split_once('?') {
            None => (s, Wire::Detect),
            Some((rest, q)) if rest.starts_with("grpc+") => match q {
                "wire=tvix" => (rest, Wire::Tvix),
                "wire=snix" => (rest, Wire::Snix),
                _ => return Err(bad("the one parameter is wire=tvix or wire=snix")),
            },
            Some(_) => return Err(bad("only grpc+ addresses take parameters")),
        };
        if s == "memory://" {
            Ok(Addr::Memory)
        } else if let Some(p) = s.strip_prefix("local://") {
            abs(p).map(Addr::Local)
        } else if let Some(p) = s.strip_prefix("grpc+unix://") {
            abs(p).map(|p| Addr::GrpcUnix(p, wire))
        } else if let Some(hp) = s.strip_prefix("grpc+http://") {
            let hp = hp.trim_end_matches('/');
            if hp.is_empty() || hp.contains('/') {
                Err(bad("expected grpc+http://HOST:PORT"))
            } else {
                Ok(Addr::GrpcHttp(hp.into(), wire))
            }
        } else {
            Err(bad(
                "unknown scheme (memory://, local:///PATH, grpc+unix:///PATH, grpc+http://HOST:PORT, \
                 s3://BUCKET[/PREFIX]?endpoint=URL&region=R)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!("memory://".parse::<Addr>().unwrap(), Addr::Memory);
        assert_eq!(
            "local:///var/x".parse::<Addr>().unwrap(),
            Addr::Local("/var/x".into())
        );
        assert_eq!(
            "grpc+unix:///run/s.sock".parse::<Addr>().unwrap(),
            Addr::GrpcUnix("/run/s.sock".into(), Wire::Detect)
        );
        assert_eq!(
            "grpc+http://[::1]:8000".parse::<Addr>().unwrap(),
            Addr::GrpcHttp("[::1]:8000".into(), Wire::Detect)
        );
        let pinned = "grpc+unix:///run/s.sock?wire=snix";
        assert_eq!(
            pinned.parse::<Addr>().unwrap(),
            Addr::GrpcUnix("/run/s.sock".into(), Wire::Snix)
        );
        assert_eq!(pinned.parse::<Addr>().unwrap().to_string(), pinned);
        assert!("grpc+http://h:1?wire=other".parse::<Addr>().is_err());
        assert!("local:///x?wire=snix".parse::<Addr>().is_err());
        let s3 = "s3://tvix/p?endpoint=http://127.0.0.1:3900&region=garage";
        assert!(matches!(s3.parse::<Addr>().unwrap(), Addr::S3(b) if b.bucket == "tvix"));
        assert_eq!(s3.parse::<Addr>().unwrap().to_string(), s3);
        for bad in [
            "local://rel",
            "http://x",
            "grpc+http://",
            "redb:///x",
            "",
            "s3://",
            "s3://b?secret=x",
        ] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
    }
}
