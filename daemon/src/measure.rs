//! Finding daprd instances and measuring them.
//!
//! Owns what a measurement contains (see [`vouch_proto::measurement`]) and
//! the namespace-wide anomaly checks (second daprd, foreign listeners).
//! Trust boundary: everything read here describes processes we do not
//! trust; any read may fail because the process exited, and that becomes an
//! error field, never a crash. Files are read through the process's own
//! root with symlinks confined to it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;

use sha2::{Digest, Sha256};
use vouch_proto::measurement::{
    Anomaly, AnomalyKind, ContainerMeasurement, EnvMeasurement, ExeMeasurement, FileMeasurement,
    FileRole, InstanceId, Listener, Measurement,
};

use crate::hash::HashCache;
use crate::{dapr, procfs, sys};

/// What to look for and how much to read.
#[derive(Debug, Clone)]
pub struct MeasureConfig {
    /// Names (comm or executable file name) that mark a process as daprd.
    pub matchers: Vec<String>,
    /// Dapr ports only the namespace's daprd may listen on.
    pub dapr_ports: Vec<u16>,
    /// Largest config or resource file measured.
    pub max_file_bytes: u64,
    /// Largest executable hashed.
    pub max_exe_bytes: u64,
    /// containerd namespaces whose cgroup paths (`/<ns>/<id>`) name containers.
    pub containerd_namespaces: Vec<String>,
}

impl Default for MeasureConfig {
    fn default() -> Self {
        Self {
            matchers: vec!["daprd".into()],
            dapr_ports: vec![3500, 50001, 3501],
            max_file_bytes: 4 << 20,
            max_exe_bytes: 1 << 30,
            containerd_namespaces: vec!["k8s.io".into(), "default".into(), "moby".into()],
        }
    }
}

/// Looks up a container's image (implemented with containerd's API).
pub trait ImageResolver {
    /// Image name and manifest digest of container `id` in namespace `ns`.
    fn resolve(&mut self, ns: &str, id: &str, pid: u32) -> Result<(String, String), String>;
}

/// Why an instance could not be measured at all.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The process vanished or its identity could not be read.
    #[error("process {pid} is gone or unreadable: {source}")]
    Gone {
        /// The pid.
        pid: u32,
        /// The failed read.
        #[source]
        source: std::io::Error,
    },
}

/// Stateful measurer: owns the digest cache.
#[derive(Debug)]
pub struct Measurer {
    /// Configuration.
    pub cfg: MeasureConfig,
    /// Digest cache.
    pub cache: HashCache,
}

fn hex_sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Container id and runtime namespace named by a cgroup path.
pub fn container_from_cgroup(
    cgroup: &str,
    namespaces: &[String],
) -> Option<(Option<String>, String)> {
    let parts: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
    for p in parts.iter().rev() {
        let core = p
            .trim_end_matches(".scope")
            .rsplit(['-', ':'])
            .next()
            .unwrap_or(p);
        if core.len() == 64 && core.bytes().all(|b| b.is_ascii_hexdigit()) {
            let ns = parts
                .first()
                .filter(|n| namespaces.iter().any(|x| x == *n))
                .map(|n| (*n).to_owned());
            return Some((ns, core.to_owned()));
        }
    }
    match parts.as_slice() {
        [ns, id] if namespaces.iter().any(|x| x == ns) => {
            Some((Some((*ns).to_owned()), (*id).to_owned()))
        }
        _ => None,
    }
}

impl Measurer {
    /// A measurer with an empty cache.
    pub fn new(cfg: MeasureConfig) -> Self {
        Self {
            cfg,
            cache: HashCache::new(),
        }
    }

    /// Whether `pid` looks like daprd (comm or executable name matches).
    pub fn is_daprd(&self, pid: u32, comm: &str) -> bool {
        if self.cfg.matchers.iter().any(|m| m == comm) {
            return true;
        }
        match procfs::exe_link(pid) {
            Ok((p, _)) => {
                let base = p.rsplit('/').next().unwrap_or(&p);
                self.cfg.matchers.iter().any(|m| m == base)
            }
            Err(_) => false,
        }
    }

    /// Every daprd pid on the node (a full /proc scan). Matches on comm, the
    /// cheapest per-process read; the executable name is consulted only
    /// where comm may be a truncation of a matcher (comm holds 15 bytes).
    pub fn scan(&self) -> Vec<u32> {
        self.scan_with(&mut std::collections::HashSet::new())
    }

    /// Like [`Measurer::scan`], but skips pids in `cleared` (processes known
    /// not to be daprd, whose exec would have been reported by the kernel)
    /// and records the non-daprd pids it checks there. Pids no longer in
    /// /proc are dropped from `cleared`.
    pub fn scan_with(&self, cleared: &mut std::collections::HashSet<u32>) -> Vec<u32> {
        let me = std::process::id();
        let pids = procfs::pids().unwrap_or_default();
        if !cleared.is_empty() {
            let live: std::collections::HashSet<u32> = pids.iter().copied().collect();
            cleared.retain(|p| live.contains(p));
        }
        let todo: Vec<u32> = pids
            .into_iter()
            .filter(|p| *p != me && !cleared.contains(p))
            .collect();
        // Reading comm costs the kernel ~10 µs a process: split a large
        // scan over two threads.
        let check = |chunk: &[u32]| -> (Vec<u32>, Vec<u32>) {
            let (mut hit, mut miss) = (Vec::new(), Vec::new());
            let Ok(proc_dir) = sys::ProcDir::open() else {
                return (hit, miss);
            };
            let mut buf = Vec::with_capacity(64);
            for &pid in chunk {
                let Ok(rel) = std::ffi::CString::new(format!("{pid}/comm")) else {
                    continue;
                };
                if proc_dir.read(&rel, &mut buf).is_err() {
                    continue;
                }
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                let is = self
                    .cfg
                    .matchers
                    .iter()
                    .any(|m| m.as_bytes() == buf.as_slice())
                    || (buf.len() == 15
                        && self
                            .cfg
                            .matchers
                            .iter()
                            .any(|m| m.as_bytes().starts_with(&buf))
                        && self.is_daprd(pid, ""));
                if is {
                    hit.push(pid);
                } else {
                    miss.push(pid);
                }
            }
            (hit, miss)
        };
        let (mut out, misses) = if todo.len() > 256 {
            let (a, b) = todo.split_at(todo.len() / 2);
            std::thread::scope(|s| {
                let h = s.spawn(|| check(b));
                let (mut hit, mut miss) = check(a);
                if let Ok((h2, m2)) = h.join() {
                    hit.extend(h2);
                    miss.extend(m2);
                }
                (hit, miss)
            })
        } else {
            check(&todo)
        };
        cleared.extend(misses);
        out.sort_unstable();
        out
    }

    /// The identity of `pid` now.
    pub fn identity(pid: u32) -> Result<(InstanceId, procfs::Stat), MeasureError> {
        let gone = |source| MeasureError::Gone { pid, source };
        let st = procfs::stat(pid).map_err(gone)?;
        let (dev, ino, _) = procfs::exe_inode(pid).map_err(gone)?;
        Ok((
            InstanceId {
                pid,
                start_time: st.start_time,
                exe_dev: dev,
                exe_ino: ino,
            },
            st,
        ))
    }

    fn measure_exe(
        &mut self,
        pid: u32,
        id: &InstanceId,
        errors: &mut Vec<String>,
    ) -> ExeMeasurement {
        let (path, deleted) = procfs::exe_link(pid).unwrap_or_else(|e| {
            errors.push(format!("exe link: {e}"));
            (String::new(), false)
        });
        // The path "replaced": it now names a different inode than the one
        // running (seen from the process's root).
        // Also when deleted: a rename over the path unlinks the running
        // inode, and the path then names the replacement.
        let replaced = !path.is_empty()
            && match sys::open_in_root(pid, &path).and_then(|f| f.metadata()) {
                Ok(m) => {
                    use std::os::unix::fs::MetadataExt;
                    (m.dev(), m.ino()) != (id.exe_dev, id.exe_ino)
                }
                Err(_) => false,
            };
        let mut out = ExeMeasurement {
            path,
            deleted,
            replaced,
            ..Default::default()
        };
        match std::fs::File::open(procfs::path(pid, "exe")) {
            Ok(f) => match self.cache.hash_file(f, self.cfg.max_exe_bytes) {
                Ok((d, size)) => {
                    out.sha256 = Some(hex::encode(d));
                    out.size = size;
                }
                Err(e) => errors.push(format!("exe hash: {e}")),
            },
            Err(e) => errors.push(format!("exe open: {e}")),
        }
        out
    }

    fn measure_env(pid: u32) -> EnvMeasurement {
        let mut env = EnvMeasurement::default();
        match procfs::environ(pid) {
            Err(e) => env.error = Some(e.to_string()),
            Ok(vars) => {
                for (k, v) in vars {
                    let text = || String::from_utf8_lossy(&v).into_owned();
                    match k.as_slice() {
                        b"DAPR_API_TOKEN" => env.dapr_api_token_sha256 = Some(hex_sha(&v)),
                        b"APP_API_TOKEN" => env.app_api_token_sha256 = Some(hex_sha(&v)),
                        b"DAPR_TRUST_ANCHORS" => env.trust_anchors_sha256 = Some(hex_sha(&v)),
                        b"NAMESPACE" => env.namespace = Some(text()),
                        b"SENTRY_LOCAL_IDENTITY" => env.sentry_local_identity = Some(text()),
                        b"DAPR_SENTRY_TOKEN_FILE" => env.sentry_token_file = Some(text()),
                        _ => {}
                    }
                }
            }
        }
        env
    }

    /// A path as the process sees it: relative paths are against its cwd.
    fn in_proc(pid: u32, p: &str) -> String {
        if p.starts_with('/') {
            return p.to_owned();
        }
        match std::fs::read_link(procfs::path(pid, "cwd")) {
            Ok(cwd) => format!("{}/{}", cwd.to_string_lossy().trim_end_matches('/'), p),
            Err(_) => format!("/{p}"),
        }
    }

    fn measure_file(
        &mut self,
        pid: u32,
        path: &str,
        role: FileRole,
        keep: bool,
    ) -> (FileMeasurement, Option<Vec<u8>>) {
        let mut fm = FileMeasurement {
            path: path.to_owned(),
            role,
            sha256: None,
            size: None,
            error: None,
        };
        let mut content = None;
        let f = match sys::open_in_root(pid, path) {
            Ok(f) => f,
            Err(e) => {
                fm.error = Some(e.to_string());
                return (fm, None);
            }
        };
        if keep {
            // Config files: read once (capped) to hash and parse.
            let cap = self.cfg.max_file_bytes;
            match f.metadata() {
                Ok(m) if !m.is_file() => fm.error = Some("not a regular file".into()),
                Ok(m) if m.len() > cap => {
                    fm.error = Some(format!(
                        "file is {} bytes, over the {cap}-byte measurement cap",
                        m.len()
                    ));
                    fm.size = Some(m.len());
                }
                Ok(_) => {
                    let mut buf = Vec::new();
                    match f.take(cap + 1).read_to_end(&mut buf) {
                        Ok(_) if buf.len() as u64 > cap => {
                            fm.error =
                                Some(format!("file grew over the {cap}-byte measurement cap"));
                        }
                        Ok(_) => {
                            fm.sha256 = Some(hex_sha(&buf));
                            fm.size = Some(buf.len() as u64);
                            content = Some(buf);
                        }
                        Err(e) => fm.error = Some(e.to_string()),
                    }
                }
                Err(e) => fm.error = Some(e.to_string()),
            }
        } else {
            match self.cache.hash_file(f, self.cfg.max_file_bytes) {
                Ok((d, size)) => {
                    fm.sha256 = Some(hex::encode(d));
                    fm.size = Some(size);
                }
                Err(e) => fm.error = Some(e.to_string()),
            }
        }
        (fm, content)
    }

    fn list_dir(pid: u32, dir: &str) -> Result<Vec<String>, String> {
        // Listing through /proc/PID/root; entries are then opened confined.
        let host = format!("/proc/{pid}/root/{}", dir.trim_start_matches('/'));
        let rd = std::fs::read_dir(&host).map_err(|e| e.to_string())?;
        let mut names: Vec<String> = rd
            .filter_map(Result::ok)
            .filter(|e| e.file_type().map(|t| !t.is_dir()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names
            .into_iter()
            .map(|n| format!("{}/{n}", dir.trim_end_matches('/')))
            .collect())
    }

    /// Measures one instance. Fails only if the process is gone before its
    /// identity could be read; everything else degrades to error fields.
    pub fn measure(
        &mut self,
        pid: u32,
        resolver: Option<&mut (dyn ImageResolver + '_)>,
    ) -> Result<Measurement, MeasureError> {
        let (id, st) = Self::identity(pid)?;
        let mut errors = Vec::new();
        let exe = self.measure_exe(pid, &id, &mut errors);
        let argv: Vec<String> = match procfs::cmdline(pid) {
            Ok(a) => a
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
            Err(e) => {
                errors.push(format!("cmdline: {e}"));
                Vec::new()
            }
        };
        let flags = dapr::parse_flags(&argv);
        let env = Self::measure_env(pid);
        let mut files = Vec::new();
        let mut mtls = None;
        for (i, c) in flags.config.iter().enumerate() {
            let p = Self::in_proc(pid, c);
            let (fm, content) = self.measure_file(pid, &p, FileRole::Config, true);
            if i == 0 {
                if let Some(bytes) = content {
                    match dapr::config_mtls_enabled(&bytes) {
                        Ok(v) => mtls = v,
                        Err(e) => errors.push(format!("config {p}: {e}")),
                    }
                }
            }
            files.push(fm);
        }
        for dir in &flags.resources_paths {
            let d = Self::in_proc(pid, dir);
            match Self::list_dir(pid, &d) {
                Ok(entries) => {
                    for p in entries {
                        files.push(self.measure_file(pid, &p, FileRole::Resource, false).0);
                    }
                }
                Err(e) => files.push(FileMeasurement {
                    path: d,
                    role: FileRole::Resource,
                    sha256: None,
                    size: None,
                    error: Some(e),
                }),
            }
        }
        let (uid, gid) = procfs::ids(pid).unwrap_or_else(|e| {
            errors.push(format!("status: {e}"));
            (u32::MAX, u32::MAX)
        });
        let netns = procfs::netns(pid).unwrap_or_else(|e| {
            errors.push(format!("netns: {e}"));
            0
        });
        let cgroup = procfs::cgroup(pid).unwrap_or_else(|e| {
            errors.push(format!("cgroup: {e}"));
            String::new()
        });
        let container =
            container_from_cgroup(&cgroup, &self.cfg.containerd_namespaces).map(|(ns, cid)| {
                let mut c = ContainerMeasurement {
                    id: cid.clone(),
                    runtime_namespace: ns.clone(),
                    ..Default::default()
                };
                match (ns, resolver) {
                    (Some(ns), Some(r)) => match r.resolve(&ns, &cid, pid) {
                        Ok((image, digest)) => {
                            c.image = Some(image);
                            c.image_digest = Some(digest);
                        }
                        Err(e) => c.error = Some(e),
                    },
                    (None, _) => c.error = Some("container runtime namespace unknown".into()),
                    (_, None) => c.error = Some("no container runtime configured".into()),
                }
                c
            });
        let listeners = own_listeners(pid).unwrap_or_else(|e| {
            errors.push(format!("listeners: {e}"));
            Vec::new()
        });
        Ok(Measurement {
            id,
            comm: st.comm,
            exe,
            argv,
            flags,
            env,
            files,
            config_mtls_enabled: mtls,
            uid,
            gid,
            netns,
            cgroup,
            container,
            listeners,
            errors,
        })
    }

    /// Namespace-wide anomalies among `instances` (all measured daprd).
    pub fn anomalies<'a>(
        &self,
        instances: impl IntoIterator<Item = &'a Measurement>,
    ) -> Vec<Anomaly> {
        let mut out = Vec::new();
        let mut by_ns: BTreeMap<u64, Vec<&Measurement>> = BTreeMap::new();
        for m in instances {
            by_ns.entry(m.netns).or_default().push(m);
            let exe_anomaly = |kind, detail: String| Anomaly {
                kind,
                instance: Some(m.id),
                netns: m.netns,
                other_pid: None,
                other_exe: None,
                port: None,
                path: Some(m.exe.path.clone()),
                detail,
            };
            if m.exe.deleted {
                out.push(exe_anomaly(
                    AnomalyKind::ExeDeleted,
                    format!(
                        "executable {} of daprd {} was deleted while running",
                        m.exe.path, m.id
                    ),
                ));
            }
            if m.exe.replaced {
                out.push(exe_anomaly(
                    AnomalyKind::ExeReplaced,
                    format!(
                        "{} now names another file than daprd {} runs",
                        m.exe.path, m.id
                    ),
                ));
            }
        }
        for (ns, ms) in by_ns {
            if ns == 0 {
                continue;
            }
            if ms.len() > 1 {
                for m in &ms {
                    let other = ms.iter().find(|o| o.id != m.id);
                    out.push(Anomaly {
                        kind: AnomalyKind::SecondDaprdInNetns,
                        instance: Some(m.id),
                        netns: ns,
                        other_pid: other.map(|o| o.id.pid),
                        other_exe: other.map(|o| o.exe.path.clone()),
                        port: None,
                        path: None,
                        detail: format!(
                            "{} daprd instances share network namespace {ns}",
                            ms.len()
                        ),
                    });
                }
            }
            out.extend(self.foreign_listeners(ns, &ms));
        }
        out
    }

    fn foreign_listeners(&self, ns: u64, ms: &[&Measurement]) -> Vec<Anomaly> {
        let Some(first) = ms.first() else {
            return Vec::new();
        };
        let Ok(all) = procfs::ns_listeners(first.id.pid) else {
            return Vec::new();
        };
        let mut owned: HashSet<u64> = HashSet::new();
        for m in ms {
            if let Ok(s) = procfs::socket_inodes(m.id.pid) {
                owned.extend(s);
            }
        }
        let mut ports: HashSet<u16> = self.cfg.dapr_ports.iter().copied().collect();
        let mut uds_dirs = Vec::new();
        for m in ms {
            ports.extend(dapr::expected_ports(&m.flags));
            if let Some(d) = &m.flags.unix_domain_socket {
                uds_dirs.push(format!("{}/", d.trim_end_matches('/')));
            }
        }
        let suspects: Vec<&procfs::NsListener> = all
            .iter()
            .filter(|l| !owned.contains(&l.inode))
            .filter(|l| {
                (l.proto != "unix" && ports.contains(&l.port))
                    || (l.proto == "unix"
                        && uds_dirs.iter().any(|d| l.address.starts_with(d.as_str())))
            })
            .collect();
        if suspects.is_empty() {
            return Vec::new();
        }
        let owners = socket_owners(ns, suspects.iter().map(|l| l.inode).collect());
        let mut out = Vec::new();
        for l in suspects {
            let (pid, exe) = owners.get(&l.inode).cloned().unzip();
            for m in ms {
                out.push(Anomaly {
                    kind: AnomalyKind::ForeignListener,
                    instance: Some(m.id),
                    netns: ns,
                    other_pid: pid,
                    other_exe: exe.clone(),
                    port: (l.port != 0).then_some(l.port),
                    path: (l.proto == "unix").then(|| l.address.clone()),
                    detail: format!(
                        "{} listens on {} {}:{} in daprd {}'s network namespace",
                        pid.map_or("an unknown process".to_owned(), |p| format!(
                            "pid {p} ({})",
                            exe.clone().unwrap_or_default()
                        )),
                        l.proto,
                        l.address,
                        l.port,
                        m.id
                    ),
                });
            }
        }
        out
    }
}

/// Listening sockets held by `pid`.
pub fn own_listeners(pid: u32) -> std::io::Result<Vec<Listener>> {
    let mine = procfs::socket_inodes(pid)?;
    let mut out: Vec<Listener> = procfs::ns_listeners(pid)?
        .into_iter()
        .filter(|l| mine.contains(&l.inode))
        .map(|l| Listener {
            proto: l.proto.to_owned(),
            address: l.address,
            port: l.port,
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Which process (pid, executable) holds each socket inode, searching the
/// processes in network namespace `ns`.
pub fn socket_owners(ns: u64, mut inodes: HashSet<u64>) -> HashMap<u64, (u32, String)> {
    let mut out = HashMap::new();
    for pid in procfs::pids().unwrap_or_default() {
        if inodes.is_empty() {
            break;
        }
        if procfs::netns(pid).ok() != Some(ns) {
            continue;
        }
        if let Ok(socks) = procfs::socket_inodes(pid) {
            let hit: Vec<u64> = inodes.intersection(&socks).copied().collect();
            for ino in hit {
                inodes.remove(&ino);
                let exe = procfs::exe_link(pid).map(|(p, _)| p).unwrap_or_default();
                out.insert(ino, (pid, exe));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_container_ids() {
        let ns = vec!["default".to_owned(), "k8s.io".to_owned()];
        let id = "a".repeat(64);
        assert_eq!(
            container_from_cgroup(
                &format!("/kubepods/burstable/pod1/cri-containerd-{id}.scope"),
                &ns
            ),
            Some((None, id.clone()))
        );
        assert_eq!(
            container_from_cgroup(&format!("/k8s.io/{id}"), &ns),
            Some((Some("k8s.io".into()), id))
        );
        assert_eq!(
            container_from_cgroup("/default/standin1", &ns),
            Some((Some("default".into()), "standin1".into()))
        );
        assert_eq!(
            container_from_cgroup("/user.slice/user-0.slice/session-1.scope", &ns),
            None
        );
    }
}
