//! Generates the vouch.v1 gRPC code from proto/vouch/v1/*.proto.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/vouch/v1/attestation.proto",
            "proto/dapr/proto/sentry/v1/sentry.proto",
            "proto/spiffe/workload.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
