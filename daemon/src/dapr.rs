//! What daprd's argv and Configuration say, parsed the way daprd parses
//! them (Go `flag`: `-f v`, `--f v`, `--f=v`; booleans take no value unless
//! written `--f=true|false`).
//!
//! Trust boundary: argv and the Configuration file belong to the measured
//! process and may be anything (binary garbage, huge, malformed YAML). The
//! parsers never panic; what does not parse becomes an error string in the
//! measurement.

use vouch_proto::measurement::DaprFlags;

const BOOL_FLAGS: &[&str] = &[
    "enable-mtls",
    "enable-profiling",
    "enable-metrics",
    "enable-api-logging",
    "enable-app-health-check",
    "log-as-json",
    "disable-builtin-k8s-secret-store",
];

fn port(errors: &mut Vec<String>, name: &str, v: &str) -> Option<u16> {
    match v.trim().parse::<u16>() {
        Ok(p) => Some(p),
        Err(_) => {
            errors.push(format!("--{name}: {v:?} is not a port"));
            None
        }
    }
}

fn boolean(errors: &mut Vec<String>, name: &str, v: Option<&str>) -> bool {
    match v {
        None => true,
        Some("true" | "1" | "t" | "T" | "TRUE" | "True") => true,
        Some("false" | "0" | "f" | "F" | "FALSE" | "False") => false,
        Some(other) => {
            errors.push(format!("--{name}: {other:?} is not a boolean"));
            false
        }
    }
}

/// Parses daprd's flags from argv (argv[0] is skipped).
pub fn parse_flags(argv: &[String]) -> DaprFlags {
    let mut f = DaprFlags::default();
    let mut i = 1;
    while i < argv.len() {
        let arg = &argv[i];
        i += 1;
        let Some(stripped) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            continue; // positional: daprd takes none
        };
        if stripped.is_empty() {
            break; // "--": end of flags
        }
        let (name, inline) = match stripped.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (stripped, None),
        };
        if BOOL_FLAGS.contains(&name) {
            let v = boolean(&mut f.errors, name, inline);
            match name {
                "enable-mtls" => f.enable_mtls = v,
                "enable-profiling" => f.enable_profiling = v,
                _ => {}
            }
            continue;
        }
        let value = match inline {
            Some(v) => v.to_owned(),
            None => match argv.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => {
                    f.errors.push(format!("--{name}: missing value"));
                    break;
                }
            },
        };
        let e = &mut f.errors;
        match name {
            "app-id" => f.app_id = Some(value),
            "mode" => f.mode = Some(value),
            "dapr-http-port" => f.http_port = port(e, name, &value),
            "dapr-grpc-port" => f.grpc_port = port(e, name, &value),
            "dapr-public-port" => f.public_port = port(e, name, &value),
            "dapr-internal-grpc-port" => f.internal_grpc_port = port(e, name, &value),
            "profile-port" => f.profile_port = port(e, name, &value),
            "app-port" => f.app_port = port(e, name, &value),
            "dapr-listen-addresses" => {
                f.listen_addresses = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "unix-domain-socket" => f.unix_domain_socket = Some(value),
            "sentry-address" => f.sentry_address = Some(value),
            "control-plane-trust-domain" => f.control_plane_trust_domain = Some(value),
            "control-plane-namespace" => f.control_plane_namespace = Some(value),
            "config" => f.config.push(value),
            "resources-path" | "components-path" => f.resources_paths.push(value),
            _ => {}
        }
    }
    f
}

/// Ports daprd listens on given its flags (daprd's defaults applied).
pub fn expected_ports(f: &DaprFlags) -> Vec<u16> {
    let mut p = vec![f.http_port.unwrap_or(3500), f.grpc_port.unwrap_or(50001)];
    p.extend(f.public_port);
    p.extend(f.internal_grpc_port);
    if f.enable_profiling {
        p.push(f.profile_port.unwrap_or(7777));
    }
    p
}

/// `spec.mtls.enabled` of a Configuration document; `Err` says why the
/// YAML could not be read (with line and column).
pub fn config_mtls_enabled(yaml: &[u8]) -> Result<Option<bool>, String> {
    let doc: serde_yaml::Value = serde_yaml::from_slice(yaml).map_err(|e| e.to_string())?;
    if let Some(kind) = doc.get("kind").and_then(|k| k.as_str()) {
        if kind != "Configuration" {
            return Err(format!("kind is {kind:?}, not Configuration"));
        }
    }
    Ok(doc
        .get("spec")
        .and_then(|s| s.get("mtls"))
        .and_then(|m| m.get("enabled"))
        .and_then(serde_yaml::Value::as_bool))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn argv(s: &[&str]) -> Vec<String> {
        std::iter::once("daprd")
            .chain(s.iter().copied())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn go_flag_forms() {
        let f = parse_flags(&argv(&[
            "--app-id",
            "orders",
            "-dapr-http-port=3600",
            "--enable-mtls",
            "--enable-profiling=false",
            "--config",
            "/c.yaml",
            "--components-path",
            "/comp",
            "--resources-path=/res",
            "--dapr-listen-addresses",
            "127.0.0.1, ::1",
            "--dapr-grpc-port",
            "notaport",
        ]));
        assert_eq!(f.app_id.as_deref(), Some("orders"));
        assert_eq!(f.http_port, Some(3600));
        assert!(f.enable_mtls);
        assert!(!f.enable_profiling);
        assert_eq!(f.config, vec!["/c.yaml"]);
        assert_eq!(f.resources_paths, vec!["/comp", "/res"]);
        assert_eq!(f.listen_addresses, vec!["127.0.0.1", "::1"]);
        assert_eq!(f.grpc_port, None);
        assert_eq!(f.errors.len(), 1);
    }

    #[test]
    fn mtls_from_configuration() {
        let y = b"apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: false\n";
        assert_eq!(config_mtls_enabled(y), Ok(Some(false)));
        assert!(config_mtls_enabled(b"spec: [unclosed").is_err());
        assert_eq!(config_mtls_enabled(b"kind: Configuration\n"), Ok(None));
    }

    proptest! {
        #[test]
        fn never_panics(args in proptest::collection::vec(".{0,12}", 0..12), y in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut a = vec!["daprd".to_owned()];
            a.extend(args);
            let _ = parse_flags(&a);
            let _ = config_mtls_enabled(&y);
        }
    }
}
