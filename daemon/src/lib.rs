//! # vouch-daemon
//!
//! `vouchd`, the per-node daemon. This library holds its parts so the
//! end-to-end tests can drive them; the binary wires them up.
//!
//! - [`tpm`]: the only module that touches tss-esapi.
//! - [`config`]: TOML configuration with environment overrides.

pub mod config;
pub mod containerd;
pub mod creds;
pub mod daemon;
pub mod dapr;
pub mod hash;
pub mod measure;
pub mod procfs;
pub mod push;
pub mod runlog;
pub mod sentry;
pub mod serve;
pub mod sys;
pub mod tpm;
pub mod workload;
