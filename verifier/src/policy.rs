//! Sidecar policies: Kubernetes-style YAML documents (`apiVersion`, `kind`,
//! `metadata`, `spec`) that say which daprd sidecars the verifier may vouch
//! for.
//!
//! Owns parsing and validation of policy files and directories. Trust
//! boundary: policies are the operator's input, still checked strictly:
//! unknown fields are rejected, and every error names the file, the line
//! and the field, so a typo can never silently weaken a policy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The only apiVersion understood.
pub const API_VERSION: &str = "vouch.dev/v1alpha1";
/// The only kind understood.
pub const KIND: &str = "SidecarPolicy";

/// A policy error, naming the file, the line and the field.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax or schema error.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, with the field path.
        message: String,
    },
    /// A value that parsed but is not acceptable.
    #[error("{path}: field {field}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Dotted field path.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Enforce (withhold credentials) or audit (report only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Violations contraindicate the sidecar.
    #[default]
    Enforce,
    /// Violations are warnings; nothing is withheld.
    Audit,
}

/// What vouchd does to the process of a sidecar this policy contraindicates
/// (besides withdrawing its credentials, which always happens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// Nothing more (the default).
    #[default]
    None,
    /// SIGSTOP the process (an operator can inspect and SIGCONT it).
    Stop,
    /// SIGKILL the process.
    Kill,
}

impl Response {
    /// The wire name: "", "stop" or "kill".
    pub fn as_str(self) -> &'static str {
        match self {
            Response::None => "",
            Response::Stop => "stop",
            Response::Kill => "kill",
        }
    }
}

/// Policy metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Policy name (unique in a directory).
    pub name: String,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Which sidecars a policy applies to (all given conditions must hold;
/// empty means any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Dapr namespaces (the measured NAMESPACE env, default "default").
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// App ids.
    #[serde(default)]
    pub app_ids: Vec<String>,
    /// Node labels that must all match.
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
}

/// A trusted daprd build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedDigest {
    /// SHA-256 of the executable (hex).
    pub sha256: String,
    /// Version label, for reports.
    #[serde(default)]
    pub version: Option<String>,
}

/// Required posture.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Posture {
    /// `spec.mtls.enabled: true` in the Configuration.
    #[serde(default)]
    pub require_mtls: bool,
    /// `--enable-profiling` off.
    #[serde(default)]
    pub forbid_profiling: bool,
    /// Listen addresses loopback-only, or unix sockets.
    #[serde(default)]
    pub listen_loopback_only: bool,
    /// DAPR_API_TOKEN present.
    #[serde(default)]
    pub require_api_token: bool,
    /// Runs as a non-root user.
    #[serde(default)]
    pub require_non_root: bool,
}

/// Where an app id may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Placement {
    /// The app id.
    pub app_id: String,
    /// Namespaces it may run in (empty: any).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Node labels it requires (empty: any node).
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
}

/// The policy body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    /// Enforce or audit.
    #[serde(default)]
    pub mode: Mode,
    /// Which sidecars this applies to.
    #[serde(default)]
    pub selector: Selector,
    /// Trusted daprd executables (empty: any digest is accepted).
    #[serde(default)]
    pub trusted_daprd: Vec<TrustedDigest>,
    /// Allowed container image manifest digests (empty: no rule).
    #[serde(default)]
    pub allowed_images: Vec<String>,
    /// Allowed Configuration/component file digests (empty: no rule).
    #[serde(default)]
    pub allowed_files: Vec<String>,
    /// Required posture.
    #[serde(default)]
    pub posture: Posture,
    /// Placement rules (empty: no rule).
    #[serde(default)]
    pub placement: Vec<Placement>,
    /// At most this many daprd per network namespace.
    #[serde(default = "one")]
    pub max_daprd_per_netns: u32,
    /// Dapr ports only the namespace's daprd may listen on.
    #[serde(default = "default_ports")]
    pub exclusive_ports: Vec<u16>,
    /// Boot PCR reference values (index -> hex SHA-256).
    #[serde(default)]
    pub boot_pcrs: BTreeMap<u8, String>,
    /// What to do to the process when this policy (in enforce mode)
    /// contraindicates it: none (default), stop or kill.
    #[serde(default)]
    pub response: Response,
}

fn one() -> u32 {
    1
}

fn default_ports() -> Vec<u16> {
    vec![3500, 50001, 3501]
}

/// A policy document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The rules.
    pub spec: Spec,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Policy {
    /// Parses and validates one YAML document from `path`'s content.
    pub fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        let p: Policy = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            PolicyError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.to_string(),
            }
        })?;
        p.validate(path)?;
        Ok(p)
    }

    fn validate(&self, path: &Path) -> Result<(), PolicyError> {
        let bad = |field: &str, message: String| PolicyError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            message,
        };
        if self.api_version != API_VERSION {
            return Err(bad(
                "apiVersion",
                format!("{:?} is not {API_VERSION:?}", self.api_version),
            ));
        }
        if self.kind != KIND {
            return Err(bad("kind", format!("{:?} is not {KIND:?}", self.kind)));
        }
        if self.metadata.name.trim().is_empty() {
            return Err(bad("metadata.name", "must not be empty".into()));
        }
        for (i, d) in self.spec.trusted_daprd.iter().enumerate() {
            if !is_hex(&d.sha256, 64) {
                return Err(bad(
                    &format!("spec.trustedDaprd[{i}].sha256"),
                    format!("{:?} is not 64 hex digits", d.sha256),
                ));
            }
        }
        for (i, d) in self.spec.allowed_images.iter().enumerate() {
            if !d.strip_prefix("sha256:").is_some_and(|h| is_hex(h, 64)) {
                return Err(bad(
                    &format!("spec.allowedImages[{i}]"),
                    format!("{d:?} is not sha256:<64 hex digits>"),
                ));
            }
        }
        for (i, d) in self.spec.allowed_files.iter().enumerate() {
            if !is_hex(d, 64) {
                return Err(bad(
                    &format!("spec.allowedFiles[{i}]"),
                    format!("{d:?} is not 64 hex digits"),
                ));
            }
        }
        for (pcr, v) in &self.spec.boot_pcrs {
            if *pcr > 7 {
                return Err(bad(
                    &format!("spec.bootPcrs.{pcr}"),
                    "boot PCRs are 0-7".into(),
                ));
            }
            if !is_hex(v, 64) {
                return Err(bad(
                    &format!("spec.bootPcrs.{pcr}"),
                    format!("{v:?} is not a SHA-256 value (64 hex digits)"),
                ));
            }
        }
        if self.spec.max_daprd_per_netns == 0 {
            return Err(bad("spec.maxDaprdPerNetns", "must be at least 1".into()));
        }
        Ok(())
    }

    /// Loads one file (one document).
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }
}

/// Loads every `*.yaml` / `*.yml` in `dir` (sorted); all must be valid and
/// names unique, or nothing is returned (the caller keeps the last good set).
pub fn load_dir(dir: &Path) -> Result<Vec<Policy>, PolicyError> {
    let rd = std::fs::read_dir(dir).map_err(|source| PolicyError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out: Vec<Policy> = Vec::new();
    for f in files {
        let p = Policy::load(&f)?;
        if out.iter().any(|o| o.metadata.name == p.metadata.name) {
            return Err(PolicyError::Invalid {
                path: f,
                field: "metadata.name".into(),
                message: format!(
                    "{:?} is used by another policy in {}",
                    p.metadata.name,
                    dir.display()
                ),
            });
        }
        out.push(p);
    }
    Ok(out)
}

/// A `vouchd measure --json` document that cannot become a policy.
#[derive(Debug, thiserror::Error)]
#[error("measure output: {0}")]
pub struct GenerateError(String);

/// Builds a policy pinning what `vouchd measure --json` saw: the daprd
/// digests, image digests and file digests, posture that every instance
/// already meets, and the app-id -> namespace placement observed.
pub fn generate(measure_json: &str, name: &str) -> Result<Policy, GenerateError> {
    #[derive(Deserialize)]
    struct Doc {
        instances: Vec<vouch_proto::measurement::Measurement>,
    }
    let doc: Doc = serde_json::from_str(measure_json).map_err(|e| GenerateError(e.to_string()))?;
    if doc.instances.is_empty() {
        return Err(GenerateError("no daprd instances: nothing to pin".into()));
    }
    let mut spec = Spec {
        max_daprd_per_netns: 1,
        exclusive_ports: default_ports(),
        ..Default::default()
    };
    let ns_of = |m: &vouch_proto::measurement::Measurement| {
        m.env.namespace.clone().unwrap_or_else(|| "default".into())
    };
    for m in &doc.instances {
        if let Some(d) = &m.exe.sha256 {
            if !spec.trusted_daprd.iter().any(|t| &t.sha256 == d) {
                spec.trusted_daprd.push(TrustedDigest {
                    sha256: d.clone(),
                    version: None,
                });
            }
        }
        if let Some(img) = m.container.as_ref().and_then(|c| c.image_digest.clone()) {
            if !spec.allowed_images.contains(&img) {
                spec.allowed_images.push(img);
            }
        }
        for f in &m.files {
            if let Some(d) = &f.sha256 {
                if !spec.allowed_files.contains(d) {
                    spec.allowed_files.push(d.clone());
                }
            }
        }
        if let Some(app) = &m.flags.app_id {
            let ns = ns_of(m);
            match spec.placement.iter_mut().find(|p| &p.app_id == app) {
                Some(p) if !p.namespaces.contains(&ns) => p.namespaces.push(ns),
                Some(_) => {}
                None => spec.placement.push(Placement {
                    app_id: app.clone(),
                    namespaces: vec![ns],
                    node_labels: BTreeMap::new(),
                }),
            }
        }
    }
    let all =
        |f: &dyn Fn(&vouch_proto::measurement::Measurement) -> bool| doc.instances.iter().all(f);
    spec.posture = Posture {
        require_mtls: all(&|m| m.config_mtls_enabled == Some(true)),
        forbid_profiling: all(&|m| !m.flags.enable_profiling),
        listen_loopback_only: all(&|m| {
            m.flags.unix_domain_socket.is_some()
                || (!m.flags.listen_addresses.is_empty()
                    && m.flags
                        .listen_addresses
                        .iter()
                        .all(|a| a == "localhost" || a.starts_with("127.") || a == "::1"))
        }),
        require_api_token: all(&|m| m.env.dapr_api_token_sha256.is_some()),
        require_non_root: all(&|m| m.uid != 0),
    };
    Ok(Policy {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: Metadata {
            name: name.to_owned(),
            labels: BTreeMap::new(),
        },
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: orders\nspec:\n  mode: enforce\n  selector:\n    appIds: [orders]\n  posture:\n    requireMtls: true\n";

    #[test]
    fn parses_and_defaults() {
        let p = Policy::parse(Path::new("p.yaml"), GOOD).unwrap();
        assert_eq!(p.spec.max_daprd_per_netns, 1);
        assert_eq!(p.spec.exclusive_ports, vec![3500, 50001, 3501]);
        assert!(p.spec.posture.require_mtls);
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let bad = GOOD.replace("requireMtls", "requireMTLS");
        let e = Policy::parse(Path::new("orders.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("orders.yaml:10:"), "{e}");
        assert!(
            e.contains("requireMTLS") && e.contains("spec.posture"),
            "{e}"
        );
    }

    #[test]
    fn bad_digest_names_field() {
        let bad = format!("{GOOD}  trustedDaprd:\n    - sha256: nothex\n");
        let e = Policy::parse(Path::new("o.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.trustedDaprd[0].sha256"), "{e}");
    }
}
