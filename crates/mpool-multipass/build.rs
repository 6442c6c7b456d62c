//! Compiles multipassd's protocol (`proto/multipass/multipass.proto`, written from the protocol
//! reference) with protox: pure Rust, no `protoc`.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/multipass");
    let fds = protox::compile(["multipass/multipass.proto"], ["../../proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("multipass_descriptors.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
