//! Compiles the .proto files with protox (pure Rust, no protoc) and generates prost
//! messages, plus tonic client/server code when the `grpc` feature is on.

use std::{env, path::PathBuf};

const FILES: &[&str] = &[
    "proto/envoy/service/auth/v3/external_auth.proto",
    "proto/envoy/config/core/v3/grpc_service.proto",
    "proto/tokensmith/greet/v1/greet.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(FILES, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    #[cfg(feature = "grpc")]
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(true)
        .compile_fds(fds)?;
    #[cfg(not(feature = "grpc"))]
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
