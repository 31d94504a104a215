//! Compiles `proto/` with protox (pure Rust, so no system `protoc`) and writes the
//! file descriptor set that the reflection service serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script binary may be reused from a clone elsewhere
    // (a shared target directory), and must read *this* checkout's protos.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "modelpool/v1/inference.proto",
        "modelpool/v1/control.proto",
        "kserve/grpc_service.proto",
        "modelpool/worker/v1/worker.proto",
        "mmesh/model_runtime.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    // Reflection describes the public API only (modelpool.v1 and KServe v2): the worker
    // protocol is not served on the public port.
    let public = protox::compile(&files[..3], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("modelpool_descriptor.bin"),
        prost::Message::encode_to_vec(&public),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
