//! Per-method call metrics for `daemon --metrics-listen`, taken by a tower
//! layer around the whole server rather than in each handler, so every
//! service, both wire families and unknown paths are counted in one place
//! and the same way.
/// gRPC calls served, by method, and how long each took to its answer's
/// headers (a stream's first message), for `daemon --metrics-listen`.
#[derive(Default)]
pub struct CallMetrics {
    calls: [crate::wire::prometheus::Histogram; METHODS.len() + 1],
}

/// The methods counted by name (tvix's; snix's count as the same); the
/// slot after them holds every other path.
const METHODS: [&str; 13] = [
    "/tvix.castore.v1.BlobService/Stat",
    "/tvix.castore.v1.BlobService/Read",
    "/tvix.castore.v1.BlobService/Put",
    "/tvix.castore.v1.DirectoryService/Get",
    "/tvix.castore.v1.DirectoryService/Put",
    "/tvix.store.v1.PathInfoService/Get",
    "/tvix.store.v1.PathInfoService/Put",
    "/tvix.store.v1.PathInfoService/CalculateNAR",
    "/tvix.store.v1.PathInfoService/List",
    "/tvix_virtiofsd.cache.v1.CacheService/FillBlob",
    "/tvix_virtiofsd.cache.v1.CacheService/FillBlobs",
    "/tvix_virtiofsd.cache.v1.CacheService/Touch",
    "/tvix_virtiofsd.cache.v1.CacheService/ReadBlobs",
];

impl CallMetrics {
    fn slot(path: &str) -> usize {
        let tvix = crate::store::channel::tvix_path(path);
        let path = tvix.as_deref().unwrap_or(path);
        METHODS
            .iter()
            .position(|m| *m == path)
            .unwrap_or(METHODS.len())
    }

    pub fn render(&self, out: &mut String) {
        let name = "tvix_virtiofsd_grpc_call_seconds";
        crate::wire::prometheus::family(
            out,
            name,
            "histogram",
            "gRPC calls served, by method, until their answer began.",
        );
        for (i, h) in self.calls.iter().enumerate() {
            if h.count() > 0 {
                let method = METHODS
                    .get(i)
                    .map_or("other", |m| m.trim_start_matches('/'));
                h.render(out, name, &format!("method=\"{method}\","));
            }
        }
    }

    /// A tower layer counting every call into these metrics.
    pub fn layer(self: &std::sync::Arc<Self>) -> CountLayer {
        CountLayer(self.clone())
    }
}

/// See [`CallMetrics::layer`].
#[derive(Clone)]
pub struct CountLayer(std::sync::Arc<CallMetrics>);

impl<S> tower::Layer<S> for CountLayer {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: std::sync::Arc<CallMetrics>,
}

impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for Counted<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let slot = CallMetrics::slot(req.uri().path());
        let t0 = std::time::Instant::now();
        let fut = self.inner.call(req);
        let m = self.metrics.clone();
        Box::pin(async move {
            let r = fut.await;
            m.calls[slot].observe(t0.elapsed());
            r
        })
    }
}
