//! Generates the gRPC client for the subset of containerd's API vouchd uses.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(
            &[
                "proto/containerd_containers.proto",
                "proto/containerd_images.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
