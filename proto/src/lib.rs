//! # vouch-proto
//!
//! What crosses between a Vouch node (`vouchd`) and the verifier, and the
//! pure computations both sides agree on. This crate does no I/O and links no
//! TSS C library: the verifier builds and runs without libtss2.
//!
//! - [`api`]: the `vouch.v1` gRPC API (tonic/prost, from `proto/vouch/v1`);
//!   [`client`]: the one TLS endpoint configuration for reaching the verifier.
//! - [`event`]: runtime-log events — canonical encoding (byte layout in the
//!   module docs), digest, and PCR replay.
//! - [`tpm`]: TPM 2.0 structure codecs (TPMS_ATTEST, TPMT_SIGNATURE,
//!   TPMT_PUBLIC, TPML_PCR_SELECTION, TPM2B).
//! - [`quote`]: quote verification (ECDSA P-256/P-384, RSASSA/RSAPSS).
//! - [`p256`]: variable-time ECDSA P-256 verification with a comb table per
//!   AK (public inputs only), about twice ring's rate.
//! - [`name`]: object Names and qualified names.
//! - [`credential`]: software MakeCredential for RSA and ECC EKs.
//!
//! Every parser here takes untrusted bytes and returns an error naming the
//! field and offset instead of panicking; each has a property test.

pub mod client;
pub mod credential;
pub mod event;
pub mod measurement;
pub mod name;
pub mod p256;
pub mod pem;
pub mod quote;
pub mod tpm;

/// The `vouch.v1` gRPC API generated from `proto/vouch/v1/attestation.proto`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod api {
    tonic::include_proto!("vouch.v1");
}

/// Dapr Sentry's certificate API (`dapr.proto.sentry.v1.CA`), generated from
/// `proto/dapr/proto/sentry/v1/sentry.proto` (written from the wire facts).
#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod sentry {
    tonic::include_proto!("dapr.proto.sentry.v1");
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`, no proto package).
#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod workload {
    tonic::include_proto!("_");
}

/// The runtime PCR's default index: 13.
///
/// Why 13: PCRs 16 and 23 can be reset from locality 0, so anyone with TPM
/// access could erase them; 17-22 cannot be extended from locality 0. Of the
/// PCRs 0-15 that locality 0 can extend but never reset, 0-7 hold firmware
/// measurements, 8, 9 and 14 belong to boot loaders and shim, 10 to IMA, and
/// 11 and 15 are extended by systemd at run time. 12 and 13 are only touched
/// by systemd-stub before user space starts; 13 (system extensions) is the
/// rarer of the two. Whatever it held when vouchd starts is recorded in the
/// boot's first log event, and any extend vouchd did not log breaks replay,
/// which the verifier treats as an integrity failure.
pub const DEFAULT_RUNTIME_PCR: u8 = 13;

/// The boot PCRs every quote covers besides the runtime PCR.
pub const BOOT_PCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
