//! [`OversizeLayer`]: a request message over the decoding limit
//! (`MAX_REQUEST_BYTES`) is answered RESOURCE_EXHAUSTED, as gRPC's status
//! code table, grpc-go and grpc-java answer it, not OUT_OF_RANGE, tonic's
//! code for it (which clients read as a position past an end). tonic offers
//! no setting for this code, so the layer rewrites that one answer.
//!
//! Every call of the services takes one request message, which tonic decodes
//! before the handler runs; a decoding error is answered trailers-only, its
//! status in the response headers, so the body is never looked at. The
//! answer is told by its code and tonic's own message together: a handler's
//! OUT_OF_RANGE (GetUser's position past the log end) stays as it is.

use futures::{TryFutureExt, future::MapOk};
use http::{HeaderValue, Request, Response};
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// The start of tonic's message for a message over the limit (its
/// `codec/decode.rs`), as `grpc-message` carries it: percent-encoded.
const TOO_LARGE: &[u8] = b"Error,%20decoded%20message%20length%20too%20large:";

/// Wraps the server's services in [`Oversize`].
#[derive(Clone, Copy, Default)]
pub struct OversizeLayer;

impl<S> Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Oversize<S> {
        Oversize { inner }
    }
}

#[derive(Clone)]
pub struct Oversize<S> {
    inner: S,
}

type Rewrite<B> = fn(Response<B>) -> Response<B>;

impl<S, B, ResBody> Service<Request<B>> for Oversize<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = MapOk<S::Future, Rewrite<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.inner
            .call(request)
            .map_ok(resource_exhausted_if_oversize as Rewrite<ResBody>)
    }
}

/// tonic's OUT_OF_RANGE for a message over the limit becomes
/// RESOURCE_EXHAUSTED, its message kept; any other answer passes unchanged.
fn resource_exhausted_if_oversize<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    let too_large = headers
        .get("grpc-message")
        .is_some_and(|message| message.as_bytes().starts_with(TOO_LARGE));
    if out_of_range && too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn rewritten(status: Status) -> Status {
        let response = resource_exhausted_if_oversize(status.into_http::<()>());
        Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn tonics_oversize_answer_becomes_resource_exhausted() {
        // tonic's own words (codec/decode.rs), written by tonic's own encoder.
        let message =
            "Error, decoded message length too large: found 65558 bytes, the limit is: 65536 bytes";
        let status = rewritten(Status::out_of_range(message));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), message);
    }

    #[test]
    fn other_answers_pass_unchanged() {
        for status in [
            Status::out_of_range("position 0:1000 is past the end of partition 0 (log end 3)"),
            Status::out_of_range("too large"),
            Status::invalid_argument(
                "Error, decoded message length too large: found 1 bytes, the limit is: 0 bytes",
            ),
            Status::out_of_range(""),
            Status::ok(""),
        ] {
            let (code, message) = (status.code(), status.message().to_owned());
            let after = rewritten(status);
            assert_eq!((after.code(), after.message()), (code, message.as_str()));
        }
    }
}
