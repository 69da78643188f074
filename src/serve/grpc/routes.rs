//! Both wire families on one set of services: snix renamed tvix's
//! packages, so the same request arrives under two paths. Routing them at
//! the edge keeps one implementation of each service, and lets a daemon
//! turn a family off so that it answers as a server without it would.
/// Which wire families a daemon answers (both by default): a snix name is
/// served by the same service as its tvix name.
#[derive(Clone, Copy, Debug)]
pub struct Families {
    pub tvix: bool,
    pub snix: bool,
}

impl Default for Families {
    fn default() -> Self {
        Self {
            tvix: true,
            snix: true,
        }
    }
}

/// For `Server::builder().layer(tower::util::MapRequestLayer::new(..))`:
/// routes snix's request paths to the tvix services, and a family that is
/// off to no service at all (UNIMPLEMENTED, as from a server without it).
pub fn wire_names(
    families: Families,
) -> impl Fn(
    tonic::codegen::http::Request<tonic::body::Body>,
) -> tonic::codegen::http::Request<tonic::body::Body>
       + Clone {
    use crate::store::channel::{snix_path, tvix_path};
    move |mut req| {
        let path = req.uri().path();
        let new = if let Some(t) = tvix_path(path) {
            families.snix.then_some(t).or(Some(format!("/off{path}")))
        } else if snix_path(path).is_some() && !families.tvix {
            Some(format!("/off{path}"))
        } else {
            None
        };
        if let Some(p) = new {
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = p.parse().ok();
            if let Ok(uri) = tonic::codegen::http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        req
    }
}
