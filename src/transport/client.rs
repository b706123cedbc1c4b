//! Whether a client's failed call failed on its connection (a transport
//! error: refused, reset, a GOAWAY, a dead peer) or got the service's own
//! answer. The tools (faultcheck, loadgen) retry the first kind on a new
//! connection. Decided by the error's source chain, never by its message:
//! a status the server sent carries no source, while one the client made
//! from a failed connection carries the hyper, h2 or I/O error behind it
//! (and "connection" or "reset" in a server's message means nothing).

use std::error::Error;
use tonic::Status;

/// True when something in `status`'s source chain is a hyper, h2, I/O or
/// tonic transport error, or tonic's failure to connect.
pub fn is_transport_error(status: &Status) -> bool {
    let mut next = Error::source(status);
    while let Some(e) = next {
        if e.is::<hyper::Error>()
            || e.is::<h2::Error>()
            || e.is::<std::io::Error>()
            || e.is::<tonic::transport::Error>()
            || e.is::<tonic::ConnectError>()
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_servers_answer_is_not_a_transport_error_whatever_it_says() {
        for message in [
            "h2 protocol error: GOAWAY",
            "connection reset",
            "transport error",
        ] {
            assert!(!is_transport_error(&Status::internal(message)));
            assert!(!is_transport_error(&Status::unavailable(message)));
        }
    }

    #[test]
    fn the_source_chain_decides() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "peer reset");
        assert!(is_transport_error(&Status::from_error(Box::new(reset))));
        // h2's RST_STREAM or GOAWAY, as tonic turns it into a status.
        let h2 = Status::from_error(Box::new(h2::Error::from(h2::Reason::CANCEL)));
        assert_eq!(h2.code(), tonic::Code::Cancelled);
        assert!(is_transport_error(&h2));
        // Deeper in the chain, behind an error of another kind.
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] std::io::Error);
        let mut status = Status::unavailable("x");
        status.set_source(Arc::new(Wrapped(std::io::ErrorKind::BrokenPipe.into())));
        assert!(is_transport_error(&status));
        let mut other = Status::unavailable("x");
        other.set_source(Arc::new(std::fmt::Error));
        assert!(!is_transport_error(&other));
    }
}
