//! Compiles `proto/*.proto` into Rust types with prost, and their proto3
//! JSON mapping (serde impls) with pbjson, which the HTTP endpoints speak.
//!
//! The .proto files are parsed by protox, a protobuf compiler written in Rust,
//! so `cargo build` needs no `protoc` binary on the machine: one less system
//! package to install, and the same result on every host.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/swiftlet.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let descriptor_bytes = prost::Message::encode_to_vec(&fds);
    let mut config = prost_build::Config::new();
    // Bodies are opaque bytes: keep them as `bytes::Bytes` so a frame's body is
    // shared, not copied, between the decoder, the store and every push.
    config.bytes([".swiftlet.v1.Send.body", ".swiftlet.v1.Message.body"]);
    config.compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".swiftlet.v1"])?;
    Ok(())
}
