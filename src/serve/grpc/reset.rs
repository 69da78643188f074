//! Request bodies that turn a client's reset into an error. The guard
//! wraps every request's body at the server's edge (a tower layer), so no
//! upload handler can take a broken-off stream for a finished one.
use tonic::Status;

/// Request bodies whose errors keep no HTTP/2 reset reason. tonic hands a
/// handler a client's RST_STREAM(CANCEL) as a clean end of the request
/// stream, so without this an abandoned upload would be stored truncated.
pub struct ResetIsError(tonic::body::Body);

impl http_body::Body for ResetIsError {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        match std::task::ready!(std::pin::Pin::new(&mut self.0).poll_frame(cx)) {
            Some(Err(e)) => std::task::Poll::Ready(Some(Err(Status::aborted(format!(
                "request stream broken off: {}",
                e.message()
            ))))),
            other => std::task::Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// For `Server::builder().layer(tower::util::MapRequestLayer::new(reset_is_error))`.
pub fn reset_is_error(
    req: tonic::codegen::http::Request<tonic::body::Body>,
) -> tonic::codegen::http::Request<tonic::body::Body> {
    req.map(|b| tonic::body::Body::new(ResetIsError(b)))
}
