//! Compiles mpool's public API (`proto/mpool/v1`) with protox (pure Rust, no `protoc`): the
//! messages and the gRPC service (tonic-prost-build), their proto3 JSON mapping as serde impls
//! (pbjson-build; the HTTP/JSON facade speaks it), and the encoded descriptor set for gRPC
//! reflection and the facade's OpenAPI document.
//!
//! The two well-known types the API uses carry JSON impls too: `Duration` is pbjson-types', and
//! `Timestamp` is mpool's own (`crate::proto::Timestamp`), written as RFC 3339 in UTC with a `Z`
//! as the proto3 JSON mapping requires.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/mpool");
    let fds = protox::compile(["mpool/v1/pool.proto"], ["../../proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("descriptors.bin"), &descriptors)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".google.protobuf.Duration", "::pbjson_types::Duration")
        .extern_path(".google.protobuf.Timestamp", "crate::proto::Timestamp")
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .out_dir(&out)
        .emit_fields()
        .build(&[".mpool.v1"])?;
    Ok(())
}
