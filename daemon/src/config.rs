//! vouchd configuration: a TOML file plus `VOUCHD_*` environment overrides,
//! validated into a typed [`Config`] at start.
//!
//! Trust boundary: the file and environment are the operator's; they are
//! still validated strictly (unknown keys rejected, ranges checked) so that a
//! typo fails loudly at start instead of weakening attestation.

use std::path::{Path, PathBuf};

use crate::tpm::{AkAlg, EkChoice};

/// Configuration errors name the file (or variable) and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// TOML error with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// An environment override does not parse.
    #[error("environment variable {var}={value:?}: {reason}")]
    Env {
        /// Variable name.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A value is out of range.
    #[error("config field {field}: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tcti: Option<String>,
    state_dir: Option<PathBuf>,
    ek: Option<EkChoice>,
    ak: Option<AkAlg>,
    runtime_pcr: Option<u8>,
    log_format: Option<LogFormat>,
    matchers: Option<Vec<String>>,
    dapr_ports: Option<Vec<u16>>,
    rescan_interval_ms: Option<u64>,
    max_file_bytes: Option<u64>,
    containerd_socket: Option<PathBuf>,
    containerd_namespaces: Option<Vec<String>>,
    verifier_url: Option<String>,
    verifier_ca: Option<PathBuf>,
    node_name: Option<String>,
    node_labels: Option<std::collections::BTreeMap<String, String>>,
    heartbeat_ms: Option<u64>,
    workload_socket: Option<PathBuf>,
    workload_group: Option<String>,
    sentry_socket: Option<PathBuf>,
    bundle_file: Option<PathBuf>,
    token_dirs: Option<Vec<PathBuf>>,
}

/// Validated vouchd configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// TCTI string of the TPM.
    pub tcti: String,
    /// Directory for the AK blob and the runtime log (created 0700).
    pub state_dir: PathBuf,
    /// Which EK to use.
    pub ek: EkChoice,
    /// AK algorithm (only used when creating the AK).
    pub ak: AkAlg,
    /// The runtime PCR (SHA-256 bank).
    pub runtime_pcr: u8,
    /// Log output format.
    pub log_format: LogFormat,
    /// What to measure and how.
    pub measure: crate::measure::MeasureConfig,
    /// Safety-net /proc rescan interval.
    pub rescan_interval: std::time::Duration,
    /// containerd's gRPC socket (image lookups); absent socket = no lookups.
    pub containerd_socket: PathBuf,
    /// The verifier (https://host:port) and its CA certificate; none: no push.
    pub verifier: Option<(String, PathBuf)>,
    /// Node name presented at enrollment.
    pub node_name: String,
    /// Node labels presented at enrollment.
    pub node_labels: std::collections::BTreeMap<String, String>,
    /// Evidence heartbeat.
    pub heartbeat: std::time::Duration,
    /// Credential serving (only with a verifier).
    pub serve: ServeConfig,
}

/// Where vouchd serves credentials to attested sidecars.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// SPIFFE Workload API socket (mode 0660).
    pub workload_socket: PathBuf,
    /// Group owning the Workload API socket (name or number); none: vouchd's.
    pub workload_gid: Option<u32>,
    /// Attesting Dapr Sentry endpoint (TLS on a unix socket).
    pub sentry_socket: PathBuf,
    /// The trust bundle (PEM) is kept here, for DAPR_TRUST_ANCHORS.
    pub bundle_file: PathBuf,
    /// Sentry token files are written only under these directories (as the
    /// daprd sees them); empty: anywhere its own uid could write.
    pub token_dirs: Vec<PathBuf>,
}

/// Resolves a group name or number via /etc/group.
fn group_id(g: &str) -> Option<u32> {
    if let Ok(n) = g.parse() {
        return Some(n);
    }
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut it = l.split(':');
            (it.next() == Some(g)).then(|| it.nth(1)?.parse().ok())?
        })
}

fn env_parse<T: serde::de::DeserializeOwned>(var: &'static str) -> Result<Option<T>, ConfigError> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(value) => {
            // Reuse serde's enum/number parsing through a one-key TOML doc.
            let doc = format!("v = {}", toml_literal(&value));
            #[derive(serde::Deserialize)]
            struct One<T> {
                v: T,
            }
            toml::from_str::<One<T>>(&doc)
                .map(|o| Some(o.v))
                .map_err(|e| ConfigError::Env {
                    var,
                    value,
                    reason: e.message().to_owned(),
                })
        }
    }
}

fn toml_literal(v: &str) -> String {
    if v.parse::<i64>().is_ok() {
        v.to_owned()
    } else {
        format!("{:?}", v)
    }
}

impl Config {
    /// Loads `path` (if given), applies `VOUCHD_*` overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut raw = match path {
            None => RawConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: p.to_owned(),
                    source,
                })?
            }
        };
        if let Some(v) = env_parse("VOUCHD_TCTI")? {
            raw.tcti = Some(v);
        }
        if let Some(v) = env_parse::<String>("VOUCHD_STATE_DIR")? {
            raw.state_dir = Some(v.into());
        }
        if let Some(v) = env_parse("VOUCHD_EK")? {
            raw.ek = Some(v);
        }
        if let Some(v) = env_parse("VOUCHD_AK")? {
            raw.ak = Some(v);
        }
        if let Some(v) = env_parse("VOUCHD_RUNTIME_PCR")? {
            raw.runtime_pcr = Some(v);
        }
        if let Some(v) = env_parse("VOUCHD_LOG_FORMAT")? {
            raw.log_format = Some(v);
        }
        if let Some(v) = env_parse::<String>("VOUCHD_MATCHERS")? {
            raw.matchers = Some(v.split(',').map(|s| s.trim().to_owned()).collect());
        }
        if let Some(v) = env_parse("VOUCHD_RESCAN_INTERVAL_MS")? {
            raw.rescan_interval_ms = Some(v);
        }
        if let Some(v) = env_parse::<String>("VOUCHD_CONTAINERD_SOCKET")? {
            raw.containerd_socket = Some(v.into());
        }
        if let Some(v) = env_parse::<String>("VOUCHD_VERIFIER_URL")? {
            raw.verifier_url = Some(v);
        }
        if let Some(v) = env_parse::<String>("VOUCHD_VERIFIER_CA")? {
            raw.verifier_ca = Some(v.into());
        }
        if let Some(v) = env_parse::<String>("VOUCHD_NODE_NAME")? {
            raw.node_name = Some(v);
        }
        if let Some(v) = env_parse("VOUCHD_HEARTBEAT_MS")? {
            raw.heartbeat_ms = Some(v);
        }
        if let Some(v) = env_parse::<String>("VOUCHD_WORKLOAD_SOCKET")? {
            raw.workload_socket = Some(v.into());
        }
        if let Some(v) = env_parse::<String>("VOUCHD_WORKLOAD_GROUP")? {
            raw.workload_group = Some(v);
        }
        if let Some(v) = env_parse::<String>("VOUCHD_SENTRY_SOCKET")? {
            raw.sentry_socket = Some(v.into());
        }
        if let Some(v) = env_parse::<String>("VOUCHD_BUNDLE_FILE")? {
            raw.bundle_file = Some(v.into());
        }
        if let Some(v) = env_parse::<String>("VOUCHD_TOKEN_DIRS")? {
            raw.token_dirs = Some(
                v.split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect(),
            );
        }
        if let Some(v) = env_parse::<String>("VOUCHD_CONTAINERD_NAMESPACES")? {
            raw.containerd_namespaces = Some(v.split(',').map(|s| s.trim().to_owned()).collect());
        }
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let runtime_pcr = raw.runtime_pcr.unwrap_or(vouch_proto::DEFAULT_RUNTIME_PCR);
        match runtime_pcr {
            0..=7 => {
                return Err(ConfigError::Invalid {
                    field: "runtime_pcr",
                    reason: format!("{runtime_pcr} is a boot PCR (0-7) that firmware measures into"),
                })
            }
            16 | 23 => {
                return Err(ConfigError::Invalid {
                    field: "runtime_pcr",
                    reason: format!("{runtime_pcr} can be reset from locality 0, so anyone with TPM access could erase the log"),
                })
            }
            17..=22 => {
                return Err(ConfigError::Invalid {
                    field: "runtime_pcr",
                    reason: format!("{runtime_pcr} cannot be extended from locality 0"),
                })
            }
            24.. => {
                return Err(ConfigError::Invalid {
                    field: "runtime_pcr",
                    reason: format!("{runtime_pcr} is not a PCR index (0-23)"),
                })
            }
            _ => {}
        }
        let tcti = raw.tcti.unwrap_or_else(|| "device:/dev/tpmrm0".to_owned());
        if tcti.trim().is_empty() {
            return Err(ConfigError::Invalid {
                field: "tcti",
                reason: "empty".into(),
            });
        }
        let mut measure = crate::measure::MeasureConfig::default();
        if let Some(m) = raw.matchers {
            if m.is_empty() || m.iter().any(|x| x.is_empty()) {
                return Err(ConfigError::Invalid {
                    field: "matchers",
                    reason: "must name at least one non-empty process name".into(),
                });
            }
            measure.matchers = m;
        }
        if let Some(p) = raw.dapr_ports {
            measure.dapr_ports = p;
        }
        if let Some(b) = raw.max_file_bytes {
            if b == 0 {
                return Err(ConfigError::Invalid {
                    field: "max_file_bytes",
                    reason: "must be positive".into(),
                });
            }
            measure.max_file_bytes = b;
        }
        if let Some(n) = raw.containerd_namespaces {
            measure.containerd_namespaces = n;
        }
        let rescan = raw.rescan_interval_ms.unwrap_or(5000);
        if !(100..=3_600_000).contains(&rescan) {
            return Err(ConfigError::Invalid {
                field: "rescan_interval_ms",
                reason: format!("{rescan} is outside 100..=3600000"),
            });
        }
        let verifier = match (raw.verifier_url, raw.verifier_ca) {
            (None, None) => None,
            (Some(u), Some(ca)) => {
                if !u.starts_with("https://") {
                    return Err(ConfigError::Invalid {
                        field: "verifier_url",
                        reason: format!("{u:?} must be https:// (vouchd only talks TLS)"),
                    });
                }
                Some((u, ca))
            }
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    field: "verifier_ca",
                    reason: "required with verifier_url (the verifier's CA certificate, PEM)"
                        .into(),
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    field: "verifier_url",
                    reason: "required with verifier_ca".into(),
                })
            }
        };
        let heartbeat = raw.heartbeat_ms.unwrap_or(10_000);
        if !(100..=3_600_000).contains(&heartbeat) {
            return Err(ConfigError::Invalid {
                field: "heartbeat_ms",
                reason: format!("{heartbeat} is outside 100..=3600000"),
            });
        }
        let node_name = raw.node_name.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "node".into())
        });
        let workload_gid = match raw.workload_group.as_deref() {
            None => None,
            Some(g) => Some(group_id(g).ok_or_else(|| ConfigError::Invalid {
                field: "workload_group",
                reason: format!("no group {g:?} in /etc/group"),
            })?),
        };
        let state_dir: PathBuf = raw.state_dir.unwrap_or_else(|| "/var/lib/vouch".into());
        let serve = ServeConfig {
            workload_socket: raw
                .workload_socket
                .unwrap_or_else(|| "/run/vouch/workload.sock".into()),
            workload_gid,
            sentry_socket: raw
                .sentry_socket
                .unwrap_or_else(|| "/run/vouch/sentry.sock".into()),
            bundle_file: raw
                .bundle_file
                .unwrap_or_else(|| state_dir.join("bundle.pem")),
            token_dirs: raw.token_dirs.unwrap_or_default(),
        };
        if let Some(d) = serve.token_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(ConfigError::Invalid {
                field: "token_dirs",
                reason: format!("{} is not an absolute path", d.display()),
            });
        }
        Ok(Self {
            serve,
            verifier,
            node_name,
            node_labels: raw.node_labels.unwrap_or_default(),
            heartbeat: std::time::Duration::from_millis(heartbeat),
            measure,
            rescan_interval: std::time::Duration::from_millis(rescan),
            containerd_socket: raw
                .containerd_socket
                .unwrap_or_else(|| "/run/containerd/containerd.sock".into()),
            tcti,
            state_dir,
            ek: raw.ek.unwrap_or_default(),
            ak: raw.ak.unwrap_or_default(),
            runtime_pcr,
            log_format: raw.log_format.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_fields_with_line() {
        let err = toml::from_str::<RawConfig>("tcti = \"swtpm\"\nruntime_prc = 13\n");
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("runtime_prc"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn rejects_resettable_pcr() {
        for pcr in [16u8, 23, 3, 20, 30] {
            let raw = RawConfig {
                runtime_pcr: Some(pcr),
                ..Default::default()
            };
            assert!(Config::validate(raw).is_err(), "pcr {pcr}");
        }
        let ok = Config::validate(RawConfig::default());
        assert_eq!(ok.map(|c| c.runtime_pcr).ok(), Some(13));
    }
}
