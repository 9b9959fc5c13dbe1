//! What vouchd measures about a daprd instance, and how those measurements
//! ride inside runtime-log events.
//!
//! Owns the shared vocabulary of node and verifier: instance identity,
//! measurements, anomalies, and the tags of each event kind's body. Trust
//! boundary: produced by vouchd, consumed by the verifier only after the
//! event carrying it replayed into a quoted PCR. Decoding is strict
//! (unknown fields rejected) and never panics.
//!
//! Event bodies (see [`crate::event`] for the record encoding):
//!
//! | kind | tag 1 | tag 2 | tag 3 | tag 4 | tag 5 | tag 6 |
//! |---|---|---|---|---|---|---|
//! | BootStart | PCR value found (bytes) | resetCount (u64) | restartCount (u64) | vouchd executable SHA-256 (bytes) | runtime PCR index (u64) | |
//! | DaemonStart | PCR value found | resetCount | restartCount | vouchd SHA-256 | runtime PCR | integrity lost (bool), tag 7: reason (str) |
//! | InstanceMeasured | | | [`Measurement`] (bytes, postcard) | | | |
//! | FileChanged | | changed path (str) | [`Measurement`] (bytes, postcard) | | | |
//! | InstanceExited | | | [`InstanceId`] (bytes, postcard) | | | |
//! | Anomaly | | | [`Anomaly`] (bytes, postcard) | | | |
//!
//! The payloads (tag 3) are the types below in the postcard wire format
//! (serde, fields in declaration order; unsigned integers as LEB128
//! varints, strings and sequences length-prefixed, `Option` as a 0/1 byte,
//! enum variants by index; no maps), so one measurement has exactly one
//! encoding. Logs written before this encoding carry the same types as JSON
//! text in tag 1; decoding accepts either (tag 3 wins), encoding writes
//! tag 3 only.

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventKind, Record, Value};

/// Body tag of the JSON payload in measurement, exit and anomaly events
/// written by earlier versions (still decoded).
pub const TAG_JSON: u16 = 1;
/// Body tag of the postcard payload in measurement, exit and anomaly events.
pub const TAG_BIN: u16 = 3;
/// Body tag of the changed path in FileChanged events.
pub const TAG_CHANGED_PATH: u16 = 2;

/// Identity of one daprd instance: a reused pid or a swapped binary is a new
/// instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceId {
    /// Process id (host pid namespace).
    pub pid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22).
    pub start_time: u64,
    /// Device of the executable inode.
    pub exe_dev: u64,
    /// Inode of the executable.
    pub exe_ino: u64,
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.pid, self.start_time)
    }
}

/// The executable as it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExeMeasurement {
    /// Path the kernel reports for /proc/PID/exe (without " (deleted)").
    pub path: String,
    /// SHA-256 (hex) of the running inode, read through /proc/PID/exe.
    pub sha256: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// The file was deleted from disk since exec.
    pub deleted: bool,
    /// The path now names a different file than the one running.
    pub replaced: bool,
}

/// daprd's security-relevant flags, parsed from argv.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaprFlags {
    /// --app-id.
    pub app_id: Option<String>,
    /// --mode (standalone, kubernetes).
    pub mode: Option<String>,
    /// --dapr-http-port (daprd default 3500).
    pub http_port: Option<u16>,
    /// --dapr-grpc-port (default 50001).
    pub grpc_port: Option<u16>,
    /// --dapr-public-port.
    pub public_port: Option<u16>,
    /// --dapr-internal-grpc-port.
    pub internal_grpc_port: Option<u16>,
    /// --dapr-listen-addresses (comma separated; empty = all interfaces).
    pub listen_addresses: Vec<String>,
    /// --unix-domain-socket (a directory).
    pub unix_domain_socket: Option<String>,
    /// --enable-mtls.
    pub enable_mtls: bool,
    /// --sentry-address.
    pub sentry_address: Option<String>,
    /// --control-plane-trust-domain.
    pub control_plane_trust_domain: Option<String>,
    /// --control-plane-namespace.
    pub control_plane_namespace: Option<String>,
    /// --config (repeatable).
    pub config: Vec<String>,
    /// --resources-path / --components-path (repeatable).
    pub resources_paths: Vec<String>,
    /// --enable-profiling.
    pub enable_profiling: bool,
    /// --profile-port.
    pub profile_port: Option<u16>,
    /// --app-port.
    pub app_port: Option<u16>,
    /// Flags that did not parse (e.g. a port that is not a number).
    pub errors: Vec<String>,
}

/// Security-relevant environment: presence and hashes, never values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvMeasurement {
    /// SHA-256 (hex) of DAPR_API_TOKEN, if set.
    pub dapr_api_token_sha256: Option<String>,
    /// SHA-256 (hex) of APP_API_TOKEN, if set.
    pub app_api_token_sha256: Option<String>,
    /// SHA-256 (hex) of DAPR_TRUST_ANCHORS, if set.
    pub trust_anchors_sha256: Option<String>,
    /// NAMESPACE.
    pub namespace: Option<String>,
    /// SENTRY_LOCAL_IDENTITY.
    pub sentry_local_identity: Option<String>,
    /// DAPR_SENTRY_TOKEN_FILE.
    pub sentry_token_file: Option<String>,
    /// Why the environment could not be read, if it could not.
    pub error: Option<String>,
}

/// Role of a measured file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileRole {
    /// A --config Configuration file.
    Config,
    /// A file under a --resources-path directory.
    Resource,
}

/// One measured file, as the instance sees it (through /proc/PID/root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMeasurement {
    /// Path inside the instance's root.
    pub path: String,
    /// Config or resource.
    pub role: FileRole,
    /// SHA-256 (hex) of the content.
    pub sha256: Option<String>,
    /// Size in bytes.
    pub size: Option<u64>,
    /// Why it could not be measured.
    pub error: Option<String>,
}

/// A listening socket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// "tcp", "tcp6" or "unix".
    pub proto: String,
    /// Local address (IP) or socket path.
    pub address: String,
    /// TCP port (0 for unix sockets).
    pub port: u16,
}

/// Container the instance runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerMeasurement {
    /// Container ID (from the cgroup path).
    pub id: String,
    /// containerd namespace, when known.
    pub runtime_namespace: Option<String>,
    /// Image name from the runtime.
    pub image: Option<String>,
    /// Image manifest digest (sha256:...) from the runtime's image store.
    pub image_digest: Option<String>,
    /// Why image details are missing.
    pub error: Option<String>,
}

/// Everything vouchd measured of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measurement {
    /// Identity.
    pub id: InstanceId,
    /// Command name (/proc/PID/comm).
    pub comm: String,
    /// The executable.
    pub exe: ExeMeasurement,
    /// argv, lossily decoded (non-UTF-8 bytes become U+FFFD).
    pub argv: Vec<String>,
    /// Parsed flags.
    pub flags: DaprFlags,
    /// Environment hashes.
    pub env: EnvMeasurement,
    /// Config and resource files.
    pub files: Vec<FileMeasurement>,
    /// `spec.mtls.enabled` of the (first) Configuration, when it parsed.
    pub config_mtls_enabled: Option<bool>,
    /// Real uid.
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// Network namespace inode.
    pub netns: u64,
    /// cgroup path.
    pub cgroup: String,
    /// Container, when the cgroup names one.
    pub container: Option<ContainerMeasurement>,
    /// Sockets this instance listens on.
    pub listeners: Vec<Listener>,
    /// What could not be measured (the daemon keeps going).
    pub errors: Vec<String>,
}

/// Kinds of anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// More than one daprd in one network namespace.
    SecondDaprdInNetns,
    /// A process other than the namespace's daprd listens on a Dapr port or
    /// on a daprd's unix socket path.
    ForeignListener,
    /// The running executable was deleted on disk.
    ExeDeleted,
    /// The executable's path now names another file.
    ExeReplaced,
}

/// Something that should not happen, with who and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anomaly {
    /// What.
    pub kind: AnomalyKind,
    /// The daprd instance concerned.
    pub instance: Option<InstanceId>,
    /// Network namespace inode.
    pub netns: u64,
    /// The other process (second daprd, foreign listener).
    pub other_pid: Option<u32>,
    /// Its executable path.
    pub other_exe: Option<String>,
    /// Port or socket path concerned.
    pub port: Option<u16>,
    /// Unix socket path concerned.
    pub path: Option<String>,
    /// Human-readable detail.
    pub detail: String,
}

/// Why an event body is not what its kind requires.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The event has another kind.
    #[error("event kind {found:?} where {expected:?} was required")]
    WrongKind {
        /// Required.
        expected: EventKind,
        /// Found.
        found: EventKind,
    },
    /// A required tag is missing or has another type.
    #[error("event body tag {0} missing or of the wrong type")]
    MissingTag(u16),
    /// The JSON payload (earlier versions) does not match the schema.
    #[error("event body JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The postcard payload does not match the schema.
    #[error("event body: {0}")]
    Bin(#[from] postcard::Error),
}

fn bin_body<T: Serialize>(v: &T) -> Record {
    // Serializing these plain structs into a growable buffer cannot fail
    // (no maps, no custom serializers); an empty payload would fail to
    // decode, which the verifier reports, if it ever did.
    Record::new().with(
        TAG_BIN,
        Value::Bytes(postcard::to_allocvec(v).unwrap_or_default()),
    )
}

/// Decodes the payload of `e`: postcard in tag 3, or JSON in tag 1 (logs
/// from earlier versions).
fn payload<T: serde::de::DeserializeOwned>(e: &Event) -> Result<T, BodyError> {
    match e.body.get(TAG_BIN) {
        Some(Value::Bytes(b)) => {
            let (v, rest) = postcard::take_from_bytes(b)?;
            if rest.is_empty() {
                Ok(v)
            } else {
                Err(BodyError::Bin(postcard::Error::DeserializeBadEncoding))
            }
        }
        Some(_) => Err(BodyError::MissingTag(TAG_BIN)),
        None => match e.body.get(TAG_JSON) {
            Some(Value::Str(s)) => Ok(serde_json::from_str(s)?),
            _ => Err(BodyError::MissingTag(TAG_BIN)),
        },
    }
}

/// Body of an InstanceMeasured event.
pub fn measured_body(m: &Measurement) -> Record {
    bin_body(m)
}

/// Body of a FileChanged event.
pub fn file_changed_body(m: &Measurement, path: &str) -> Record {
    bin_body(m).with(TAG_CHANGED_PATH, Value::Str(path.to_owned()))
}

/// Body of an InstanceExited event.
pub fn exited_body(id: &InstanceId) -> Record {
    bin_body(id)
}

/// Body of an Anomaly event.
pub fn anomaly_body(a: &Anomaly) -> Record {
    bin_body(a)
}

fn expect_kind(e: &Event, kinds: &[EventKind]) -> Result<(), BodyError> {
    if kinds.contains(&e.kind) {
        Ok(())
    } else {
        Err(BodyError::WrongKind {
            expected: kinds[0],
            found: e.kind,
        })
    }
}

/// The measurement in an InstanceMeasured or FileChanged event.
pub fn measurement_of(e: &Event) -> Result<Measurement, BodyError> {
    expect_kind(e, &[EventKind::InstanceMeasured, EventKind::FileChanged])?;
    payload(e)
}

/// The instance an InstanceMeasured or FileChanged event measures, read
/// from the front of its payload without decoding the rest (the
/// [`Measurement`] encoding starts with its [`InstanceId`]); None for other
/// kinds or a payload that does not start with one.
pub fn instance_of(e: &Event) -> Option<InstanceId> {
    if !matches!(e.kind, EventKind::InstanceMeasured | EventKind::FileChanged) {
        return None;
    }
    match e.body.get(TAG_BIN) {
        Some(Value::Bytes(b)) => postcard::take_from_bytes::<InstanceId>(b)
            .ok()
            .map(|(id, _)| id),
        Some(_) => None,
        None => measurement_of(e).ok().map(|m| m.id),
    }
}

/// The instance in an InstanceExited event.
pub fn exited_of(e: &Event) -> Result<InstanceId, BodyError> {
    expect_kind(e, &[EventKind::InstanceExited])?;
    payload(e)
}

/// The anomaly in an Anomaly event.
pub fn anomaly_of(e: &Event) -> Result<Anomaly, BodyError> {
    expect_kind(e, &[EventKind::Anomaly])?;
    payload(e)
}

/// Boot or daemon-start facts (BootStart / DaemonStart bodies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartFacts {
    /// Runtime PCR value found when the log (re)started.
    pub pcr_found: [u8; 32],
    /// TPM resetCount.
    pub reset_count: u32,
    /// TPM restartCount.
    pub restart_count: u32,
    /// SHA-256 of vouchd's own executable.
    pub vouchd_sha256: [u8; 32],
    /// The runtime PCR index.
    pub runtime_pcr: u8,
    /// DaemonStart only: the persisted log could not be continued.
    pub integrity_lost: bool,
    /// DaemonStart only: why.
    pub reason: Option<String>,
}

impl StartFacts {
    /// Encodes as a BootStart or DaemonStart body.
    pub fn body(&self, kind: EventKind) -> Record {
        let mut r = Record::new()
            .with(1, Value::Bytes(self.pcr_found.to_vec()))
            .with(2, Value::U64(u64::from(self.reset_count)))
            .with(3, Value::U64(u64::from(self.restart_count)))
            .with(4, Value::Bytes(self.vouchd_sha256.to_vec()))
            .with(5, Value::U64(u64::from(self.runtime_pcr)));
        if kind == EventKind::DaemonStart {
            r = r.with(6, Value::Bool(self.integrity_lost));
            if let Some(reason) = &self.reason {
                r = r.with(7, Value::Str(reason.clone()));
            }
        }
        r
    }

    /// Decodes a BootStart or DaemonStart body.
    pub fn of(e: &Event) -> Result<Self, BodyError> {
        expect_kind(e, &[EventKind::BootStart, EventKind::DaemonStart])?;
        let bytes32 = |tag| match e.body.get(tag) {
            Some(Value::Bytes(b)) if b.len() == 32 => {
                let mut a = [0u8; 32];
                a.copy_from_slice(b);
                Ok(a)
            }
            _ => Err(BodyError::MissingTag(tag)),
        };
        let u = |tag| match e.body.get(tag) {
            Some(Value::U64(v)) => Ok(*v),
            _ => Err(BodyError::MissingTag(tag)),
        };
        let u32_of =
            |tag| u(tag).and_then(|v| u32::try_from(v).map_err(|_| BodyError::MissingTag(tag)));
        Ok(Self {
            pcr_found: bytes32(1)?,
            reset_count: u32_of(2)?,
            restart_count: u32_of(3)?,
            vouchd_sha256: bytes32(4)?,
            runtime_pcr: u8::try_from(u(5)?).map_err(|_| BodyError::MissingTag(5))?,
            integrity_lost: matches!(e.body.get(6), Some(Value::Bool(true))),
            reason: match e.body.get(7) {
                Some(Value::Str(s)) => Some(s.clone()),
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests
    use super::*;
    use crate::event::Event;

    fn sample() -> Measurement {
        Measurement {
            id: InstanceId {
                pid: 42,
                start_time: 7,
                exe_dev: 1,
                exe_ino: 2,
            },
            comm: "daprd".into(),
            exe: ExeMeasurement {
                path: "/usr/bin/daprd".into(),
                sha256: Some("ab".repeat(32)),
                size: 9,
                deleted: false,
                replaced: false,
            },
            argv: vec!["daprd".into(), "--app-id".into(), "orders".into()],
            flags: DaprFlags {
                app_id: Some("orders".into()),
                ..Default::default()
            },
            env: EnvMeasurement {
                namespace: Some("prod".into()),
                ..Default::default()
            },
            files: Vec::new(),
            config_mtls_enabled: Some(true),
            uid: 1000,
            gid: 1000,
            netns: 4026531840,
            cgroup: "/".into(),
            container: None,
            listeners: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn event(kind: EventKind, body: Record) -> Event {
        Event {
            seq: 0,
            kind,
            time_unix_ns: 0,
            body,
        }
    }

    #[test]
    fn bodies_round_trip_deterministically_and_legacy_json_decodes() {
        let m = sample();
        let a = measured_body(&m);
        assert_eq!(a, measured_body(&m));
        assert_eq!(
            measurement_of(&event(EventKind::InstanceMeasured, a)).unwrap(),
            m
        );
        let legacy = Record::new().with(TAG_JSON, Value::Str(serde_json::to_string(&m).unwrap()));
        assert_eq!(
            measurement_of(&event(EventKind::InstanceMeasured, legacy)).unwrap(),
            m
        );
        let ev = event(EventKind::InstanceMeasured, measured_body(&m));
        assert_eq!(instance_of(&ev), Some(m.id));
        let x = exited_body(&m.id);
        assert_eq!(
            exited_of(&event(EventKind::InstanceExited, x)).unwrap(),
            m.id
        );
        // Trailing bytes are refused: one value, one encoding.
        let mut b = postcard::to_allocvec(&m).unwrap();
        b.push(0);
        let bad = Record::new().with(TAG_BIN, Value::Bytes(b));
        assert!(measurement_of(&event(EventKind::InstanceMeasured, bad)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), s in ".{0,200}") {
            let bin = event(EventKind::InstanceMeasured, Record::new().with(TAG_BIN, Value::Bytes(b.clone())));
            let _ = measurement_of(&bin);
            let _ = exited_of(&event(EventKind::InstanceExited, Record::new().with(TAG_BIN, Value::Bytes(b.clone()))));
            let _ = anomaly_of(&event(EventKind::Anomaly, Record::new().with(TAG_BIN, Value::Bytes(b))));
            let _ = measurement_of(&event(EventKind::InstanceMeasured, Record::new().with(TAG_JSON, Value::Str(s))));
        }
    }
}
