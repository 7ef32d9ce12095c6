//! Compiles `proto/parley.proto` (and `proto/cluster.proto`, the node-to-node link) with protox (a pure-Rust protobuf compiler, so no system `protoc`
//! is needed), generates the prost message types and their canonical proto3 JSON mapping (pbjson).

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn Error>> {
    let schema = "proto/parley.proto";
    let cluster = "proto/cluster.proto";
    println!("cargo:rerun-if-changed={schema}");
    println!("cargo:rerun-if-changed={cluster}");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile([schema, cluster], ["proto"])?;
    let descriptor_bytes = fds.encode_to_vec();
    fs::write(out.join("parley_descriptor.bin"), &descriptor_bytes)?;

    let mut config = prost_build::Config::new();
    // Bodies are carried as `bytes::Bytes` so a decoded frame borrows the read buffer (no copy).
    config.bytes([
        ".parley.v1.Send.body",
        ".parley.v1.Message.body",
        ".parley.cluster.v1.Mail.batch",
    ]);
    config.compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        // Like the binary form: a receiver ignores fields it does not know (a newer schema's).
        .ignore_unknown_fields()
        .build(&[".parley.v1"])?;
    Ok(())
}
