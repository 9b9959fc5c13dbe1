//! # vouch-verifier
//!
//! The central verifier's library: policies ([`policy`]) and the pure
//! appraisal function ([`appraise`]). Builds and runs without libtss2: all
//! TPM structures are checked by vouch-proto in pure Rust.

pub mod appraise;
pub mod ca;
pub mod config;
pub mod ear;
pub mod enroll;
pub mod http;
pub mod policy;
pub mod service;
pub mod simnode;
pub mod store;
pub mod tls;
pub mod webhook;
