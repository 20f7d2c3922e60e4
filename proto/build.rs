//! Compiles `csi/csi.proto` when the `csi` feature is on: protox (pure Rust) parses it, so the build
//! needs no system protoc; tonic-prost-build writes the messages and the client and server stubs.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=csi/csi.proto");
    #[cfg(feature = "csi")]
    {
        let fds = protox::compile(["csi/csi.proto"], ["csi"])?;
        tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    }
    Ok(())
}
