//! Compiles `proto/` with `protox` (a pure-Rust protobuf compiler), so `cargo build`
//! needs no `protoc` on the machine, and writes the encoded descriptor set that the
//! reflection service serves.
use prost::Message;
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/user/v1/user.proto", "proto/user/v1/projection.proto"];
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // `file_descriptor_set_path` only applies when protoc runs: write it ourselves.
    std::fs::write(out_dir.join("user_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
