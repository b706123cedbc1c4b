//! The generated contract, compiled from `proto/` by `build.rs`.

/// `user.v1`: the user service's messages, server and client.
pub mod user {
    pub mod v1 {
        tonic::include_proto!("user.v1");
    }
}

/// The encoded descriptor set of `proto/`, served by gRPC reflection so that
/// tools such as `grpcurl` need no proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("user_descriptor");
