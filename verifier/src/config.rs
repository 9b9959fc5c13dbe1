//! vouch-verifier configuration: TOML file plus `VOUCH_VERIFIER_*`
//! environment overrides, unknown keys rejected, validated at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Configuration errors name the file or variable and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read config file {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Bad TOML or schema (with line and column).
    #[error("config file {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
    /// Bad value.
    #[error("config field {field}: {reason}")]
    Invalid {
        /// Field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    http_listen: Option<String>,
    state_dir: Option<PathBuf>,
    policy_dir: Option<PathBuf>,
    ek_ca_bundles: Option<Vec<PathBuf>>,
    ek_allowlist: Option<Vec<String>>,
    trust_on_first_use: Option<bool>,
    nonce_ttl_ms: Option<u64>,
    stale_after_ms: Option<u64>,
    tls_names: Option<Vec<String>>,
    log_format: Option<String>,
    trust_domain: Option<String>,
    sentry_trust_domain: Option<String>,
    sentry_namespace: Option<String>,
    svid_ttl_s: Option<u64>,
    jwt_ttl_s: Option<u64>,
    credential_fresh_ms: Option<u64>,
    ca_ttl_s: Option<u64>,
    webhooks: Option<Vec<String>>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC (TLS) listen address.
    pub listen: std::net::SocketAddr,
    /// Operators' JSON API and JWKS (plain HTTP; loopback by default).
    pub http_listen: std::net::SocketAddr,
    /// State directory: state.db, TLS and EAR keys.
    pub state_dir: PathBuf,
    /// Policy directory (reloaded on change).
    pub policy_dir: PathBuf,
    /// PEM bundles of TPM-manufacturer CAs.
    pub ek_ca_bundles: Vec<PathBuf>,
    /// Hex SHA-256 of trusted EK public areas.
    pub ek_allowlist: Vec<String>,
    /// Trust EKs on first use (logged).
    pub trust_on_first_use: bool,
    /// Nonce lifetime.
    pub nonce_ttl: Duration,
    /// A node silent this long loses its affirming verdicts.
    pub stale_after: Duration,
    /// DNS names / IPs in the server certificate.
    pub tls_names: Vec<String>,
    /// JSON logs.
    pub log_json: bool,
    /// Credential issuance (trust domain, Sentry ID, lifetimes, freshness).
    pub creds: crate::service::CredSettings,
    /// Lifetime of each SVID CA generation (rotated at half-life).
    pub ca_ttl: Duration,
    /// Webhook URLs (http://) that receive every verdict change.
    pub webhooks: Vec<String>,
}

fn env_u64(var: &'static str, field: &'static str) -> Result<Option<u64>, ConfigError> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(v) => v.parse().map(Some).map_err(|_| ConfigError::Invalid {
            field,
            reason: format!("{var}={v:?} is not a number"),
        }),
    }
}

fn ranged(field: &'static str, v: u64, lo: u64, hi: u64) -> Result<u64, ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::Invalid {
            field,
            reason: format!("{v} outside {lo}..={hi}"),
        })
    }
}

fn name_part(field: &'static str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field,
            reason: format!("{v:?}: lowercase letters, digits, '-', '.', '_' only"),
        })
    }
}

impl Config {
    /// Loads `path` (optional) and applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut raw: Raw = match path {
            None => Raw::default(),
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                toml::from_str(&t).map_err(|source| ConfigError::Parse {
                    path: p.to_owned(),
                    source,
                })?
            }
        };
        if let Ok(v) = std::env::var("VOUCH_VERIFIER_LISTEN") {
            raw.listen = Some(v);
        }
        if let Ok(v) = std::env::var("VOUCH_VERIFIER_STATE_DIR") {
            raw.state_dir = Some(v.into());
        }
        if let Ok(v) = std::env::var("VOUCH_VERIFIER_POLICY_DIR") {
            raw.policy_dir = Some(v.into());
        }
        if let Ok(v) = std::env::var("VOUCH_VERIFIER_EK_CA_BUNDLES") {
            raw.ek_ca_bundles = Some(
                v.split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect(),
            );
        }
        if let Ok(v) = std::env::var("VOUCH_VERIFIER_NONCE_TTL_MS") {
            raw.nonce_ttl_ms = Some(v.parse().map_err(|_| ConfigError::Invalid {
                field: "nonce_ttl_ms",
                reason: format!("VOUCH_VERIFIER_NONCE_TTL_MS={v:?} is not a number"),
            })?);
        }
        if let Ok(v) = std::env::var("VOUCH_VERIFIER_STALE_AFTER_MS") {
            raw.stale_after_ms = Some(v.parse().map_err(|_| ConfigError::Invalid {
                field: "stale_after_ms",
                reason: format!("VOUCH_VERIFIER_STALE_AFTER_MS={v:?} is not a number"),
            })?);
        }
        let stale = raw.stale_after_ms.unwrap_or(30_000);
        if !(500..=86_400_000).contains(&stale) {
            return Err(ConfigError::Invalid {
                field: "stale_after_ms",
                reason: format!("{stale} outside 500..=86400000"),
            });
        }
        if let Ok(v) = std::env::var("VOUCH_VERIFIER_HTTP_LISTEN") {
            raw.http_listen = Some(v);
        }
        let http = raw.http_listen.unwrap_or_else(|| "127.0.0.1:7080".into());
        let http_listen = http.parse().map_err(|e| ConfigError::Invalid {
            field: "http_listen",
            reason: format!("{http:?}: {e}"),
        })?;
        let listen = raw.listen.unwrap_or_else(|| "127.0.0.1:7443".into());
        let listen = listen.parse().map_err(|e| ConfigError::Invalid {
            field: "listen",
            reason: format!("{listen:?}: {e}"),
        })?;
        for h in raw.ek_allowlist.iter().flatten() {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::Invalid {
                    field: "ek_allowlist",
                    reason: format!("{h:?} is not a hex SHA-256"),
                });
            }
        }
        let ttl = raw.nonce_ttl_ms.unwrap_or(30_000);
        if !(100..=600_000).contains(&ttl) {
            return Err(ConfigError::Invalid {
                field: "nonce_ttl_ms",
                reason: format!("{ttl} outside 100..=600000"),
            });
        }
        if let Ok(v) = std::env::var("VOUCH_VERIFIER_TRUST_DOMAIN") {
            raw.trust_domain = Some(v);
        }
        if let Ok(v) = std::env::var("VOUCH_VERIFIER_WEBHOOKS") {
            raw.webhooks = Some(
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            );
        }
        if let Some(v) = env_u64("VOUCH_VERIFIER_SVID_TTL_S", "svid_ttl_s")? {
            raw.svid_ttl_s = Some(v);
        }
        if let Some(v) = env_u64("VOUCH_VERIFIER_JWT_TTL_S", "jwt_ttl_s")? {
            raw.jwt_ttl_s = Some(v);
        }
        if let Some(v) = env_u64("VOUCH_VERIFIER_CREDENTIAL_FRESH_MS", "credential_fresh_ms")? {
            raw.credential_fresh_ms = Some(v);
        }
        if let Some(v) = env_u64("VOUCH_VERIFIER_CA_TTL_S", "ca_ttl_s")? {
            raw.ca_ttl_s = Some(v);
        }
        let trust_domain = raw.trust_domain.unwrap_or_else(|| "cluster.local".into());
        name_part("trust_domain", &trust_domain)?;
        let sentry_td = raw
            .sentry_trust_domain
            .unwrap_or_else(|| "localhost".into());
        name_part("sentry_trust_domain", &sentry_td)?;
        let sentry_ns = raw.sentry_namespace.unwrap_or_else(|| "default".into());
        name_part("sentry_namespace", &sentry_ns)?;
        let svid_ttl = ranged("svid_ttl_s", raw.svid_ttl_s.unwrap_or(900), 2, 86_400)?;
        let jwt_ttl = ranged("jwt_ttl_s", raw.jwt_ttl_s.unwrap_or(300), 2, 86_400)?;
        let fresh = ranged(
            "credential_fresh_ms",
            raw.credential_fresh_ms.unwrap_or(30_000),
            100,
            3_600_000,
        )?;
        let ca_ttl = ranged(
            "ca_ttl_s",
            raw.ca_ttl_s.unwrap_or(30 * 86_400),
            60,
            10 * 365 * 86_400,
        )?;
        if ca_ttl < 2 * svid_ttl {
            return Err(ConfigError::Invalid {
                field: "ca_ttl_s",
                reason: format!("{ca_ttl} s must be at least twice svid_ttl_s ({svid_ttl} s)"),
            });
        }
        let webhooks = raw.webhooks.unwrap_or_default();
        for w in &webhooks {
            if crate::webhook::Target::parse(w).is_err() {
                return Err(ConfigError::Invalid {
                    field: "webhooks",
                    reason: format!("{w:?} is not an http://host:port/path URL"),
                });
            }
        }
        let log_json = match raw.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(o) => {
                return Err(ConfigError::Invalid {
                    field: "log_format",
                    reason: format!("{o:?} is not text or json"),
                })
            }
        };
        Ok(Self {
            listen,
            http_listen,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| "/var/lib/vouch-verifier".into()),
            policy_dir: raw
                .policy_dir
                .unwrap_or_else(|| "/etc/vouch/policies".into()),
            ek_ca_bundles: raw.ek_ca_bundles.unwrap_or_default(),
            ek_allowlist: raw.ek_allowlist.unwrap_or_default(),
            trust_on_first_use: raw.trust_on_first_use.unwrap_or(false),
            nonce_ttl: Duration::from_millis(ttl),
            stale_after: Duration::from_millis(stale),
            tls_names: raw
                .tls_names
                .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into()]),
            log_json,
            creds: crate::service::CredSettings {
                trust_domain,
                sentry_id: format!("spiffe://{sentry_td}/ns/{sentry_ns}/dapr-sentry"),
                svid_ttl: Duration::from_secs(svid_ttl),
                jwt_ttl: Duration::from_secs(jwt_ttl),
                fresh: Duration::from_millis(fresh),
            },
            ca_ttl: Duration::from_secs(ca_ttl),
            webhooks,
        })
    }
}
