//! `vouchd run`: the long-running witness.
//!
//! Owns the event loop: kernel process events (exec/exit) and file-watcher
//! events arrive on one channel; a periodic /proc rescan is the safety net.
//! Each new daprd instance, re-measurement, exit and anomaly becomes one
//! runtime-log event (appended, fsync'd, then extended into the runtime
//! PCR). Trust boundary: inputs are the kernel's events and /proc; the TPM
//! context is owned here and used only from this thread.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use notify::Watcher;
use vouch_proto::event::EventKind;
use vouch_proto::measurement::{self as m, Anomaly, Measurement};

use crate::measure::{ImageResolver, Measurer};
use crate::runlog::{LogError, Pcr, RuntimeLog};
use crate::sys::{ProcConnector, ProcEvent};
use crate::tpm::{Ak, Tpm, TpmError};
use crate::{procfs, sys};

/// The runtime PCR through an open TPM and the AK (for boot counters).
#[derive(Debug)]
pub struct TpmPcr {
    /// The TPM.
    pub tpm: Tpm,
    /// The AK.
    pub ak: Ak,
    /// PCR index.
    pub index: u8,
}

impl Pcr for TpmPcr {
    fn read(&mut self) -> Result<[u8; 32], TpmError> {
        let v = self.tpm.pcr_read(&[self.index])?;
        v.first()
            .and_then(|p| <[u8; 32]>::try_from(p.value.as_slice()).ok())
            .ok_or(TpmError::Malformed {
                what: "PCR_Read",
                detail: "no SHA-256 value".into(),
            })
    }
    fn extend(&mut self, d: &[u8; 32]) -> Result<(), TpmError> {
        self.tpm.pcr_extend(self.index, d)
    }
    fn boot(&mut self) -> Result<(u32, u32), TpmError> {
        self.tpm.boot_counters(&self.ak)
    }
    fn index(&self) -> u8 {
        self.index
    }
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The runtime log or TPM failed: nothing can be recorded any more.
    #[error("runtime log")]
    Log(#[from] LogError),
    /// The process-event connector could not be opened.
    #[error("kernel process-event connector (needs root / CAP_NET_ADMIN)")]
    Connector(#[source] std::io::Error),
    /// Signal handling could not be set up.
    #[error("signal handling")]
    Signals(#[source] std::io::Error),
    /// The file watcher could not be created.
    #[error("file watcher")]
    Watcher(#[from] notify::Error),
}

enum Msg {
    Shutdown(i32),
    PushNow,
    Proc(ProcEvent),
    Fs(notify::Event),
    ConnectorDied(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Task {
    Rescan,
    Recheck(u32),
    Push,
}

/// Pushing evidence to the verifier: the connection, the EK (for
/// re-enrollment), the heartbeat and the coalescing window.
pub struct Uplink {
    /// The connection.
    pub pusher: crate::push::Pusher,
    /// The EK.
    pub ek: crate::tpm::Ek,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Events within this window share one quote.
    pub coalesce: Duration,
}

struct Tracked {
    m: Measurement,
    dirs: Vec<PathBuf>,
    files: HashSet<PathBuf>,
    any_in: Vec<PathBuf>,
}

/// The daemon state.
pub struct Daemon {
    pcr: TpmPcr,
    log: RuntimeLog,
    measurer: Measurer,
    resolver: Option<Box<dyn ImageResolver>>,
    instances: HashMap<u32, Tracked>,
    anomalies: HashSet<String>,
    watcher: notify::RecommendedWatcher,
    watched: HashMap<PathBuf, usize>,
    rx: mpsc::Receiver<Msg>,
    tx: mpsc::Sender<Msg>,
    schedule: BTreeMap<(Instant, u64), Task>,
    seq: u64,
    rescan: Duration,
    ready_file: PathBuf,
    /// Pids checked and found not to be daprd; valid while the kernel's
    /// exec events arrive (an exec removes its pid, an overflow clears all).
    cleared: HashSet<u32>,
    connector_alive: bool,
    uplink: Option<Uplink>,
    push_at: Option<Instant>,
    creds: Option<std::sync::Arc<crate::creds::Creds>>,
}

/// SHA-256 of the running vouchd executable.
pub fn own_digest() -> [u8; 32] {
    std::fs::File::open("/proc/self/exe")
        .ok()
        .and_then(|f| crate::hash::sha256_reader(f, u64::MAX).ok())
        .unwrap_or([0; 32])
}

impl Daemon {
    /// Opens the runtime log and subscribes to process and file events.
    pub fn new(
        mut pcr: TpmPcr,
        state_dir: &Path,
        measurer: Measurer,
        resolver: Option<Box<dyn ImageResolver>>,
        rescan: Duration,
    ) -> Result<Self, DaemonError> {
        let log = RuntimeLog::open(state_dir, &mut pcr, own_digest())?;
        let (tx, rx) = mpsc::channel();
        let conn = ProcConnector::open().map_err(DaemonError::Connector)?;
        let ctx = tx.clone();
        std::thread::Builder::new()
            .name("proc-connector".into())
            .spawn(move || {
                let mut evs = Vec::new();
                loop {
                    evs.clear();
                    if let Err(e) = conn.recv(&mut evs) {
                        let _ = ctx.send(Msg::ConnectorDied(e.to_string()));
                        return;
                    }
                    for e in &evs {
                        if ctx.send(Msg::Proc(*e)).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(DaemonError::Connector)?;
        // SIGTERM/SIGINT end the loop between events, so an event is never
        // logged without being extended because of a polite stop.
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])
        .map_err(DaemonError::Signals)?;
        let stx = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let _ = stx.send(Msg::Shutdown(sig));
                }
            })
            .map_err(DaemonError::Signals)?;
        let wtx = tx.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                let _ = wtx.send(Msg::Fs(ev));
            }
        })?;
        Ok(Self {
            pcr,
            log,
            measurer,
            resolver,
            instances: HashMap::new(),
            anomalies: HashSet::new(),
            watcher,
            watched: HashMap::new(),
            rx,
            tx,
            schedule: BTreeMap::new(),
            seq: 0,
            rescan,
            ready_file: state_dir.join("vouchd.ready"),
            cleared: HashSet::new(),
            connector_alive: true,
            uplink: None,
            push_at: None,
            creds: None,
        })
    }

    /// Pushes evidence to a verifier (coalesced after events, and at a
    /// heartbeat).
    pub fn with_uplink(mut self, u: Uplink) -> Self {
        self.uplink = Some(u);
        self
    }

    /// Serves credentials from `creds`: instances are tracked there and
    /// every verdict reaches it.
    pub fn with_creds(mut self, c: std::sync::Arc<crate::creds::Creds>) -> Self {
        self.creds = Some(c);
        self
    }

    /// A handle that asks the running loop to push evidence now (used when
    /// the verifier lost this node's session).
    pub fn kicker(&self) -> Box<dyn Fn() + Send + Sync> {
        let tx = std::sync::Mutex::new(self.tx.clone());
        Box::new(move || {
            if let Ok(tx) = tx.lock() {
                let _ = tx.send(Msg::PushNow);
            }
        })
    }

    fn plan_push(&mut self, delay: Duration) {
        if self.uplink.is_none() {
            return;
        }
        let t = Instant::now() + delay;
        if self.push_at.is_none_or(|p| t < p) {
            self.push_at = Some(t);
            self.at(delay, Task::Push);
        }
    }

    fn push_now(&mut self) {
        let Some(u) = self.uplink.as_mut() else {
            return;
        };
        if u.pusher.node_id.is_none() {
            if let Err(e) = u.pusher.enroll(&mut self.pcr, &u.ek) {
                tracing::warn!(error = %e, "enrollment failed; retrying at the next heartbeat");
                return;
            }
        }
        match u.pusher.push(&mut self.pcr, &self.log) {
            Ok(r) => {
                if let (Some(c), Some(id)) = (&self.creds, &u.pusher.node_id) {
                    c.on_push(&r, id);
                }
                let summary: Vec<String> = r
                    .sidecars
                    .iter()
                    .map(|s| format!("{}:{}={}", s.pid, s.app_id, s.verdict))
                    .collect();
                tracing::info!(next_seq = r.next_seq, sidecars = ?summary, "evidence accepted");
            }
            Err(crate::push::PushError::Rpc { status, .. })
                if status.code() == tonic::Code::NotFound =>
            {
                tracing::warn!(%status, "verifier does not know this node; enrolling again");
                u.pusher.node_id = None;
            }
            Err(e) => {
                if let (Some(c), crate::push::PushError::Rpc { status, .. }) = (&self.creds, &e) {
                    // Refused evidence: the verifier contraindicates every
                    // sidecar here; do not wait for its Watch message.
                    c.on_push_failed(matches!(
                        status.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                    ));
                }
                tracing::warn!(error = %e, "evidence push failed")
            }
        }
    }

    /// The log's integrity state.
    pub fn log_state(&self) -> &crate::runlog::LogState {
        self.log.state()
    }

    fn at(&mut self, delay: Duration, t: Task) {
        self.seq += 1;
        self.schedule.insert((Instant::now() + delay, self.seq), t);
    }

    fn append(
        &mut self,
        kind: EventKind,
        body: vouch_proto::event::Record,
    ) -> Result<u64, DaemonError> {
        let e = self.log.append(&mut self.pcr, kind, body)?;
        tracing::info!(seq = e.seq, kind = ?e.kind, "runtime log event extended into PCR {}", self.pcr.index);
        // Events close together share one quote.
        if let Some(c) = self.uplink.as_ref().map(|u| u.coalesce) {
            self.plan_push(c);
        }
        Ok(e.seq)
    }

    /// What to watch for an instance: (directories to watch, files whose
    /// change matters, directories in which any change matters), all as
    /// host paths through /proc/PID/root.
    fn watch_set(m: &Measurement) -> (Vec<PathBuf>, HashSet<PathBuf>, Vec<PathBuf>) {
        let pid = m.id.pid;
        let root =
            |p: &str| PathBuf::from(format!("/proc/{pid}/root/{}", p.trim_start_matches('/')));
        let mut dirs = Vec::new();
        let mut files = HashSet::new();
        let mut any = Vec::new();
        let mut file = |p: &str, dirs: &mut Vec<PathBuf>| {
            let host = root(p);
            if let Some(d) = host.parent() {
                dirs.push(d.to_path_buf());
            }
            files.insert(host);
        };
        if !m.exe.path.is_empty() {
            file(&m.exe.path, &mut dirs);
        }
        for f in &m.files {
            if f.role == m::FileRole::Config {
                file(&f.path, &mut dirs);
            }
        }
        for r in &m.flags.resources_paths {
            let d = if r.starts_with('/') {
                r.clone()
            } else {
                // Relative: as measured (files carry the resolved path).
                match m.files.iter().find(|f| f.role == m::FileRole::Resource) {
                    Some(f) => Path::new(&f.path)
                        .parent()
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    None => continue,
                }
            };
            dirs.push(root(&d));
            any.push(root(&d));
        }
        dirs.sort();
        dirs.dedup();
        (dirs, files, any)
    }

    fn track(&mut self, meas: Measurement) {
        let (dirs, files, any_in) = Self::watch_set(&meas);
        for d in &dirs {
            let n = self.watched.entry(d.clone()).or_insert(0);
            if *n == 0 {
                if let Err(e) = self.watcher.watch(d, notify::RecursiveMode::NonRecursive) {
                    tracing::debug!(dir = %d.display(), error = %e, "cannot watch");
                }
            }
            *n += 1;
        }
        self.instances.insert(
            meas.id.pid,
            Tracked {
                m: meas,
                dirs,
                files,
                any_in,
            },
        );
    }

    fn untrack(&mut self, pid: u32) -> Option<Measurement> {
        let t = self.instances.remove(&pid)?;
        for d in &t.dirs {
            if let Some(n) = self.watched.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    self.watched.remove(d);
                    let _ = self.watcher.unwatch(d);
                }
            }
        }
        Some(t.m)
    }

    fn measure(&mut self, pid: u32) -> Option<Measurement> {
        let resolver = self.resolver.as_deref_mut();
        match self.measurer.measure(pid, resolver) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::debug!(pid, error = %e, "process vanished before it could be measured");
                None
            }
        }
    }

    /// A process that may be a (new) daprd instance.
    fn consider(&mut self, pid: u32) -> Result<(), DaemonError> {
        let Ok((id, st)) = Measurer::identity(pid) else {
            return self.exited(pid);
        };
        if let Some(t) = self.instances.get(&pid) {
            if t.m.id == id {
                return Ok(());
            }
            // Same pid, new identity (reused pid or exec of another binary).
            self.exited(pid)?;
        }
        if !self.measurer.is_daprd(pid, &st.comm) {
            // Not daprd, but it may be a foreign listener next to one.
            if let Ok(ns) = procfs::netns(pid) {
                let near: Vec<u32> = self
                    .instances
                    .values()
                    .filter(|t| t.m.netns == ns)
                    .map(|t| t.m.id.pid)
                    .collect();
                for p in near {
                    for ms in [20, 100, 500, 2000] {
                        self.at(Duration::from_millis(ms), Task::Recheck(p));
                    }
                }
            }
            return Ok(());
        }
        let Some(meas) = self.measure(pid) else {
            return Ok(());
        };
        tracing::info!(pid, id = %meas.id, app_id = ?meas.flags.app_id, exe_sha256 = ?meas.exe.sha256, "daprd instance measured");
        let seq = self.append(EventKind::InstanceMeasured, m::measured_body(&meas))?;
        if let Some(c) = &self.creds {
            c.track(&meas, seq);
        }
        self.track(meas);
        // Listeners and files settle after exec: look again shortly.
        for ms in [30, 150, 600, 2500] {
            self.at(Duration::from_millis(ms), Task::Recheck(pid));
        }
        self.check_anomalies()
    }

    fn exited(&mut self, pid: u32) -> Result<(), DaemonError> {
        if let Some(meas) = self.untrack(pid) {
            tracing::info!(pid, id = %meas.id, "daprd instance exited");
            if let Some(c) = &self.creds {
                c.untrack(pid);
            }
            self.append(EventKind::InstanceExited, m::exited_body(&meas.id))?;
            self.check_anomalies()?;
        }
        Ok(())
    }

    /// Re-measures a tracked instance; logs it if anything changed.
    fn recheck(&mut self, pid: u32, changed_path: Option<&str>) -> Result<(), DaemonError> {
        self.recheck_one(pid, changed_path)?;
        self.check_anomalies()
    }

    /// Re-measures one instance without the namespace-wide anomaly check.
    fn recheck_one(&mut self, pid: u32, changed_path: Option<&str>) -> Result<(), DaemonError> {
        tracing::trace!(pid, ?changed_path, "recheck");
        let Some(old) = self.instances.get(&pid).map(|t| t.m.clone()) else {
            return Ok(());
        };
        match Measurer::identity(pid) {
            Ok((id, _)) if id == old.id => {}
            _ => return self.consider(pid),
        }
        let Some(new) = self.measure(pid) else {
            return self.exited(pid);
        };
        if new != old {
            // A file whose digest changed makes this a FileChanged event,
            // whichever trigger noticed it first.
            let changed_file = new
                .files
                .iter()
                .find(|f| {
                    !old.files
                        .iter()
                        .any(|o| o.path == f.path && o.sha256 == f.sha256)
                })
                .or_else(|| {
                    old.files
                        .iter()
                        .find(|o| !new.files.iter().any(|f| f.path == o.path))
                })
                .map(|f| f.path.clone())
                .or_else(|| {
                    changed_path
                        .map(str::to_owned)
                        .filter(|_| new.exe != old.exe)
                });
            let seq = match changed_file {
                Some(p) => self.append(EventKind::FileChanged, m::file_changed_body(&new, &p))?,
                None => self.append(EventKind::InstanceMeasured, m::measured_body(&new))?,
            };
            if let Some(c) = &self.creds {
                c.touch(Some(pid), seq);
            }
            self.untrack(pid);
            self.track(new);
        }
        Ok(())
    }

    fn anomaly_key(a: &Anomaly) -> String {
        format!(
            "{:?}/{:?}/{:?}/{:?}/{:?}",
            a.kind, a.instance, a.other_pid, a.port, a.path
        )
    }

    fn check_anomalies(&mut self) -> Result<(), DaemonError> {
        let found = self
            .measurer
            .anomalies(self.instances.values().map(|t| &t.m));
        let mut now = HashSet::new();
        for a in found {
            let k = Self::anomaly_key(&a);
            if !self.anomalies.contains(&k) {
                tracing::warn!(kind = ?a.kind, detail = %a.detail, "anomaly");
                let seq = self.append(EventKind::Anomaly, m::anomaly_body(&a))?;
                if let Some(c) = &self.creds {
                    // Who is affected is the verifier's call: everyone waits.
                    c.touch(None, seq);
                }
            }
            now.insert(k);
        }
        self.anomalies = now;
        Ok(())
    }

    fn rescan_now(&mut self) -> Result<(), DaemonError> {
        let mut cleared = std::mem::take(&mut self.cleared);
        let found = self.measurer.scan_with(&mut cleared);
        self.cleared = cleared;
        let live: HashSet<u32> = found
            .into_iter()
            .chain(
                self.instances
                    .keys()
                    .copied()
                    .filter(|p| procfs::path(*p, "comm").exists()),
            )
            .collect();
        let known: Vec<u32> = self.instances.keys().copied().collect();
        for pid in known {
            if !live.contains(&pid) {
                self.exited(pid)?;
            }
        }
        for pid in live {
            self.consider(pid)?;
        }
        // Listeners and exe state can change without any event we see.
        let pids: Vec<u32> = self.instances.keys().copied().collect();
        for pid in pids {
            self.recheck_one(pid, None)?;
        }
        self.check_anomalies()
    }

    fn on_fs(&mut self, ev: notify::Event) -> Result<(), DaemonError> {
        tracing::trace!(?ev, "file event");
        // Reads, opens and metadata changes (atime, chmod) change no content.
        if matches!(
            ev.kind,
            notify::EventKind::Access(_)
                | notify::EventKind::Modify(notify::event::ModifyKind::Metadata(_))
        ) {
            return Ok(());
        }
        for path in &ev.paths {
            // Drop the cached digest of the changed file's inode (the cache
            // key's size/mtime/ctime would miss it too; this is belt and braces).
            if let Ok(meta) = std::fs::metadata(path) {
                use std::os::unix::fs::MetadataExt;
                self.measurer.cache.forget_inode(meta.dev(), meta.ino());
            }
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let hit: Vec<u32> = self
                .instances
                .iter()
                .filter(|(_, t)| t.files.contains(path) || t.any_in.iter().any(|d| d == &dir))
                .map(|(p, _)| *p)
                .collect();
            for pid in hit {
                // Show the path as the instance sees it.
                let prefix = format!("/proc/{pid}/root");
                let shown = path.to_string_lossy();
                let shown = shown.strip_prefix(&prefix).unwrap_or(&shown).to_owned();
                self.recheck(pid, Some(&shown))?;
                // Writers often finish in several steps: look again soon.
                self.at(Duration::from_millis(50), Task::Recheck(pid));
            }
        }
        Ok(())
    }

    /// Runs until SIGTERM/SIGINT (Ok) or until the runtime log fails.
    pub fn run(mut self) -> Result<(), DaemonError> {
        self.rescan_now()?;
        self.at(self.rescan, Task::Rescan);
        // Readiness for supervisors and tests: the first full scan is logged.
        if self.uplink.is_some() {
            self.push_now();
            let hb = self.uplink.as_ref().map_or(self.rescan, |u| u.heartbeat);
            self.push_at = None;
            self.plan_push(hb);
        }
        let _ = std::fs::write(&self.ready_file, format!("{}\n", std::process::id()));
        tracing::info!(instances = self.instances.len(), "vouchd running");
        loop {
            let timeout = self
                .schedule
                .keys()
                .next()
                .map(|(t, _)| t.saturating_duration_since(Instant::now()))
                .unwrap_or(self.rescan);
            match self.rx.recv_timeout(timeout) {
                Ok(Msg::Shutdown(sig)) => {
                    tracing::info!(signal = sig, "stopping");
                    let _ = std::fs::remove_file(&self.ready_file);
                    return Ok(());
                }
                Ok(Msg::Proc(ProcEvent::Exec { pid })) => {
                    self.cleared.remove(&pid);
                    self.consider(pid)?
                }
                Ok(Msg::Proc(ProcEvent::Exit { pid })) => self.exited(pid)?,
                Ok(Msg::PushNow) => {
                    let c = self.uplink.as_ref().map_or(Duration::ZERO, |u| u.coalesce);
                    self.plan_push(c);
                }
                Ok(Msg::Proc(ProcEvent::Overflow)) => {
                    tracing::warn!("kernel dropped process events; rescanning /proc");
                    self.cleared.clear();
                    self.rescan_now()?;
                }
                Ok(Msg::Fs(ev)) => self.on_fs(ev)?,
                Ok(Msg::ConnectorDied(e)) => {
                    tracing::error!(error = %e, "process-event connector failed; relying on full /proc rescans");
                    self.connector_alive = false;
                    self.cleared.clear();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            let now = Instant::now();
            while let Some((&(t, s), &task)) = self.schedule.iter().next() {
                if t > now {
                    break;
                }
                self.schedule.remove(&(t, s));
                match task {
                    Task::Rescan => {
                        if !self.connector_alive {
                            self.cleared.clear();
                        }
                        self.rescan_now()?;
                        self.at(self.rescan, Task::Rescan);
                    }
                    Task::Recheck(pid) => self.recheck(pid, None)?,
                    Task::Push => {
                        if self.push_at.is_some_and(|p| p <= now) {
                            self.push_at = None;
                            self.push_now();
                            let hb = self.uplink.as_ref().map_or(self.rescan, |u| u.heartbeat);
                            self.plan_push(hb);
                        }
                    }
                }
            }
            let _ = &self.tx;
        }
    }
}

/// One scan, no TPM: every instance with its measurements and anomalies.
pub fn measure_once(
    measurer: &mut Measurer,
    mut resolver: Option<&mut (dyn ImageResolver + '_)>,
) -> (Vec<Measurement>, Vec<Anomaly>) {
    let mut out = Vec::new();
    for pid in measurer.scan() {
        let r = resolver.as_deref_mut();
        if let Ok(meas) = measurer.measure(pid, r) {
            out.push(meas);
        }
    }
    out.sort_by_key(|m| m.id);
    let anomalies = measurer.anomalies(&out);
    let _ = sys::open_in_root;
    (out, anomalies)
}
