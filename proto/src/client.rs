//! How a node (or a tool) addresses the verifier: one TLS endpoint
//! configuration for every client. Configuration only: connecting is the
//! caller's business, so this crate still does no I/O.

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Error};

/// An endpoint for the verifier at `url` (`https://host:port`) that trusts
/// only the verifier's CA (`ca_pem`) and checks the server name against the
/// URL's host (a DNS name or an IP address).
pub fn verifier_endpoint(url: &str, ca_pem: &[u8]) -> Result<Endpoint, Error> {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split([':', '/']).next())
        .unwrap_or("localhost")
        .to_owned();
    Endpoint::from_shared(url.to_owned())?.tls_config(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name(host),
    )
}
