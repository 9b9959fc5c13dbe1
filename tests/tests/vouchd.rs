//! vouchd end to end: real stand-in daprd processes in real network
//! namespaces, a real swtpm, the real `vouchd` binary. The persisted log is
//! checked against the PCR read from the TPM (with vouchd stopped, since
//! swtpm serves one client at a time).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vouch_daemon::tpm::Tpm;
use vouch_proto::event::{replay, Event, EventKind};
use vouch_proto::measurement::{
    anomaly_of, exited_of, measurement_of, AnomalyKind, Measurement, StartFacts,
};
use vouch_tests::netns::Netns;
use vouch_tests::proc::{run_ok, workspace_bin, Owned};
use vouch_tests::require_tools;
use vouch_tests::swtpm::Swtpm;
use vouch_tests::vouchd::Vouchd;

const WAIT: Duration = Duration::from_secs(15);

fn setup() -> Option<Swtpm> {
    if !require_tools(&["swtpm", "swtpm_setup", "ip", "sha256sum", "python3"]) {
        return None;
    }
    Some(Swtpm::start().unwrap())
}

fn measurements(evs: &[Event], pid: u32) -> Vec<Measurement> {
    evs.iter()
        .filter_map(|e| measurement_of(e).ok())
        .filter(|m| m.id.pid == pid)
        .collect()
}

/// With vouchd stopped: the log replays to the PCR read from the TPM.
fn assert_replays(sw: &Swtpm, v: &Vouchd) {
    let evs = v.events().unwrap();
    let start = StartFacts::of(&evs[0]).unwrap();
    let digests: Vec<[u8; 32]> = evs.iter().map(Event::digest).collect();
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let pcr = tpm.pcr_read(&[start.runtime_pcr]).unwrap();
    assert_eq!(
        hex::encode(replay(start.pcr_found, &digests)),
        hex::encode(&pcr[0].value),
        "log of {} events does not replay to the TPM's PCR",
        evs.len()
    );
}

fn standin(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> Owned {
    let mut c = ns.command(workspace_bin("daprd").unwrap());
    c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    Owned::new("stand-in daprd", c.spawn().unwrap())
}

fn sha256sum(p: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(p)).unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn sha256_hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let d = ring_sha256(b);
    d.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn ring_sha256(b: &[u8]) -> [u8; 32] {
    vouch_proto::event::digest(b)
}

#[test]
fn standin_is_measured_and_log_replays_through_its_life() {
    let Some(sw) = setup() else { return };
    let dir = sw.scratch();
    std::fs::create_dir_all(dir.join("components")).unwrap();
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: true\n").unwrap();
    std::fs::write(dir.join("components/statestore.yaml"), "kind: Component\n").unwrap();
    std::fs::write(
        dir.join("components/pubsub.yaml"),
        "kind: Component\nx: 1\n",
    )
    .unwrap();
    let mut v = Vouchd::new(&sw, &dir.join("state"));

    // start
    v.start().unwrap();
    v.stop();
    assert_replays(&sw, &v);

    // new daprd
    v.start().unwrap();
    let ns = Netns::new().unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let comp = dir.join("components");
    let mut d = standin(
        &ns,
        &[
            "--app-id",
            "orders",
            "--config",
            cfg_s,
            "--resources-path",
            comp.to_str().unwrap(),
            "--dapr-public-port",
            "3501",
            "--enable-mtls",
        ],
        &[("DAPR_API_TOKEN", "tok-123"), ("NAMESPACE", "prod")],
    );
    let pid = d.pid();
    let evs = v
        .wait_for("stand-in measured with listeners", WAIT, |e| {
            measurements(e, pid).iter().any(|m| m.listeners.len() >= 3)
        })
        .unwrap();
    let m = measurements(&evs, pid).pop().unwrap();
    assert_eq!(
        m.exe.sha256.as_deref(),
        Some(sha256sum(&workspace_bin("daprd").unwrap()).as_str())
    );
    assert_eq!(m.flags.app_id.as_deref(), Some("orders"));
    assert!(m.flags.enable_mtls);
    assert_eq!(m.flags.public_port, Some(3501));
    assert_eq!(
        m.env.dapr_api_token_sha256.as_deref(),
        Some(sha256_hex(b"tok-123").as_str())
    );
    assert_eq!(m.env.namespace.as_deref(), Some("prod"));
    assert_eq!(m.config_mtls_enabled, Some(true));
    let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    let comp_s = comp.to_str().unwrap();
    assert_eq!(
        paths,
        vec![
            cfg_s.to_owned(),
            format!("{comp_s}/pubsub.yaml"),
            format!("{comp_s}/statestore.yaml")
        ]
    );
    assert_eq!(m.files[0].sha256.as_deref(), Some(sha256sum(&cfg).as_str()));
    let ports: Vec<u16> = m.listeners.iter().map(|l| l.port).collect();
    for p in [3500, 3501, 50001] {
        assert!(ports.contains(&p), "{ports:?}");
    }
    assert_ne!(m.netns, 0);

    // The same in `vouchd measure --json` (no TPM).
    let out =
        run_ok(Command::new(workspace_bin("vouchd").unwrap()).args(["measure", "--json"])).unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let inst = j["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"]["pid"] == pid)
        .expect("stand-in in measure --json");
    assert_eq!(
        inst["exe"]["sha256"],
        m.exe.sha256.clone().unwrap().as_str()
    );
    assert_eq!(
        inst["env"]["dapr_api_token_sha256"],
        sha256_hex(b"tok-123").as_str()
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("tok-123"),
        "token value leaked"
    );
    assert_eq!(
        inst["listeners"].as_array().unwrap().len(),
        m.listeners.len()
    );
    v.stop();
    assert_replays(&sw, &v);

    // config edit (after the restarted vouchd has measured the instance)
    v.start().unwrap();
    let n0 = v.events().unwrap().len();
    std::fs::write(&cfg, "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: false\n").unwrap();
    let evs = v
        .wait_for("config change re-measured", WAIT, |e| {
            e[n0..].iter().any(|e| {
                e.kind == EventKind::FileChanged
                    && measurement_of(e)
                        .is_ok_and(|m| m.id.pid == pid && m.config_mtls_enabled == Some(false))
            })
        })
        .unwrap();
    let m2 = measurements(&evs, pid).pop().unwrap();
    assert_eq!(
        m2.files[0].sha256.as_deref(),
        Some(sha256sum(&cfg).as_str())
    );
    v.stop();
    assert_replays(&sw, &v);

    // daprd exit
    v.start().unwrap();
    d.stop();
    v.wait_for("instance exit", WAIT, |e| {
        e.iter().any(|e| exited_of(e).is_ok_and(|id| id.pid == pid))
    })
    .unwrap();
    v.stop();
    assert_replays(&sw, &v);

    // vouchd restart with nothing else happening
    v.start().unwrap();
    v.stop();
    assert_replays(&sw, &v);
    let evs = v.events().unwrap();
    assert_eq!(evs[0].kind, EventKind::BootStart);
    assert!(
        evs.iter()
            .filter(|e| e.kind == EventKind::DaemonStart)
            .count()
            >= 4
    );
    assert!(evs
        .iter()
        .all(|e| e.kind != EventKind::DaemonStart || !StartFacts::of(e).unwrap().integrity_lost));
}

fn anomalies_for(
    evs: &[Event],
    kind: AnomalyKind,
    pid: u32,
) -> Vec<vouch_proto::measurement::Anomaly> {
    evs.iter()
        .filter_map(|e| anomaly_of(e).ok())
        .filter(|a| a.kind == kind && a.instance.is_some_and(|i| i.pid == pid))
        .collect()
}

#[test]
fn second_daprd_in_one_netns_is_an_anomaly_but_not_across_netns() {
    let Some(sw) = setup() else { return };
    let mut v = Vouchd::new(&sw, &sw.scratch().join("state"));
    v.start().unwrap();
    let (shared, b, c) = (
        Netns::new().unwrap(),
        Netns::new().unwrap(),
        Netns::new().unwrap(),
    );
    let a1 = standin(&shared, &["--app-id", "a1"], &[]);
    let a2 = standin(
        &shared,
        &[
            "--app-id",
            "a2",
            "--dapr-http-port",
            "3600",
            "--dapr-grpc-port",
            "50002",
        ],
        &[],
    );
    let b1 = standin(&b, &["--app-id", "b1"], &[]);
    let c1 = standin(&c, &["--app-id", "c1"], &[]);
    let evs = v
        .wait_for("second-daprd anomaly", WAIT, |e| {
            !anomalies_for(e, AnomalyKind::SecondDaprdInNetns, a1.pid()).is_empty()
                && !anomalies_for(e, AnomalyKind::SecondDaprdInNetns, a2.pid()).is_empty()
        })
        .unwrap();
    let a = &anomalies_for(&evs, AnomalyKind::SecondDaprdInNetns, a1.pid())[0];
    assert_eq!(a.other_pid, Some(a2.pid()));
    // b1 and c1 (one daprd each, in their own namespaces): measured, no anomaly,
    // also after rescans.
    v.wait_for("b1 and c1 measured", WAIT, |e| {
        !measurements(e, b1.pid()).is_empty() && !measurements(e, c1.pid()).is_empty()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let evs = v.events().unwrap();
    for p in [b1.pid(), c1.pid()] {
        let any: Vec<_> = evs
            .iter()
            .filter_map(|e| anomaly_of(e).ok())
            .filter(|a| a.instance.is_some_and(|i| i.pid == p))
            .collect();
        assert!(any.is_empty(), "unexpected anomalies for {p}: {any:?}");
    }
}

#[test]
fn foreign_listener_on_3500_is_an_anomaly_naming_pid_and_exe() {
    let Some(sw) = setup() else { return };
    let mut v = Vouchd::new(&sw, &sw.scratch().join("state"));
    v.start().unwrap();
    let ns = Netns::new().unwrap();
    // The daprd is configured elsewhere; port 3500 stays a Dapr port.
    let d = standin(
        &ns,
        &[
            "--app-id",
            "orders",
            "--dapr-http-port",
            "3600",
            "--dapr-grpc-port",
            "50002",
        ],
        &[],
    );
    v.wait_for("daprd measured", WAIT, |e| {
        !measurements(e, d.pid()).is_empty()
    })
    .unwrap();
    let mut py = ns.command("python3");
    py.args(["-c", "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0',3500))\ns.listen()\ntime.sleep(60)"])
        .stdout(Stdio::null());
    let impostor = Owned::new("python listener", py.spawn().unwrap());
    let evs = v
        .wait_for("foreign-listener anomaly", WAIT, |e| {
            anomalies_for(e, AnomalyKind::ForeignListener, d.pid())
                .iter()
                .any(|a| a.other_pid == Some(impostor.pid()))
        })
        .unwrap();
    let a = anomalies_for(&evs, AnomalyKind::ForeignListener, d.pid())
        .into_iter()
        .find(|a| a.other_pid == Some(impostor.pid()))
        .unwrap();
    assert_eq!(a.port, Some(3500));
    assert!(
        a.other_exe.as_deref().unwrap_or("").contains("python3"),
        "{a:?}"
    );
}

#[test]
fn replacing_the_binary_on_disk_is_an_anomaly_and_digest_stays() {
    let Some(sw) = setup() else { return };
    let dir = sw.scratch().join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("daprd");
    std::fs::copy(workspace_bin("daprd").unwrap(), &exe).unwrap();
    let original = sha256sum(&exe);
    let mut v = Vouchd::new(&sw, &sw.scratch().join("state"));
    v.start().unwrap();
    let ns = Netns::new().unwrap();
    let mut c = ns.command(&exe);
    c.args(["--app-id", "swap"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let d = Owned::new("stand-in", c.spawn().unwrap());
    v.wait_for("measured", WAIT, |e| !measurements(e, d.pid()).is_empty())
        .unwrap();
    // Swap the file under the running process (write elsewhere, rename over).
    let tmp = dir.join("daprd.new");
    let mut bytes = std::fs::read(&exe).unwrap();
    bytes.extend_from_slice(b"tampered");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &exe).unwrap();
    let evs = v
        .wait_for("exe-replaced anomaly", WAIT, |e| {
            !anomalies_for(e, AnomalyKind::ExeReplaced, d.pid()).is_empty()
        })
        .unwrap();
    let last = measurements(&evs, d.pid()).pop().unwrap();
    assert!(last.exe.replaced);
    assert_eq!(
        last.exe.sha256.as_deref(),
        Some(original.as_str()),
        "digest must stay that of the running inode"
    );
    assert_ne!(sha256sum(&exe), original);
}

#[test]
fn deleted_or_truncated_log_gives_integrity_lost_not_a_fresh_log() {
    let Some(sw) = setup() else { return };
    for damage in ["truncate", "delete"] {
        let state = sw.scratch().join(format!("state-{damage}"));
        let mut v = Vouchd::new(&sw, &state);
        v.start().unwrap();
        v.stop();
        let log = state.join("runtime.log");
        match damage {
            "truncate" => {
                let len = std::fs::metadata(&log).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&log)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            }
            _ => std::fs::remove_file(&log).unwrap(),
        }
        v.start().unwrap();
        let evs = v.events().unwrap();
        let first = StartFacts::of(&evs[0]).unwrap();
        assert_eq!(
            evs[0].kind,
            EventKind::DaemonStart,
            "{damage}: must not be a fresh boot log"
        );
        assert!(first.integrity_lost, "{damage}");
        assert!(state.join("integrity.json").exists());
        // It stays lost across another restart in the same boot.
        v.stop();
        v.start().unwrap();
        let evs = v.events().unwrap();
        let last_start = evs
            .iter()
            .rev()
            .find(|e| e.kind == EventKind::DaemonStart)
            .unwrap();
        assert!(
            StartFacts::of(last_start).unwrap().integrity_lost,
            "{damage}: lost state must persist"
        );
        v.stop();
        assert_replays(&sw, &v);
    }
}

#[test]
fn bad_input_never_crashes_vouchd() {
    let Some(sw) = setup() else { return };
    let dir = sw.scratch();
    let cfg = dir.join("vouchd.toml");
    std::fs::write(&cfg, "max_file_bytes = 4096\n").unwrap();
    let huge = dir.join("huge.yaml");
    std::fs::write(&huge, vec![b'a'; 10_000]).unwrap();
    let bad_yaml = dir.join("bad.yaml");
    std::fs::write(&bad_yaml, "kind: Configuration\nspec: [unclosed\n").unwrap();
    let mut v = Vouchd::new(&sw, &dir.join("state")).config(&cfg);
    v.start().unwrap();
    let ns = Netns::new().unwrap();

    use std::os::unix::ffi::OsStrExt;
    let garbage = std::ffi::OsStr::from_bytes(&[0xff, 0xfe, b'-', b'-', 0x80, b'=', 0xc3]);
    let mut c = ns.command(workspace_bin("daprd").unwrap());
    c.arg("--app-id")
        .arg(garbage)
        .arg("--config")
        .arg(&huge)
        .arg("--config")
        .arg(&bad_yaml);
    c.args([
        "--resources-path",
        "/nonexistent/dir",
        "--dapr-http-port",
        "notaport",
    ]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let d1 = Owned::new("garbage stand-in", c.spawn().unwrap());
    let evs = v
        .wait_for("garbage measured", WAIT, |e| {
            !measurements(e, d1.pid()).is_empty()
        })
        .unwrap();
    let m = measurements(&evs, d1.pid()).pop().unwrap();
    assert!(
        m.files[0].error.as_deref().unwrap_or("").contains("cap"),
        "{:?}",
        m.files[0]
    );
    assert!(
        m.files[2].error.is_some(),
        "missing resources dir must be an error field"
    );
    assert!(!m.flags.errors.is_empty());
    assert!(m.argv[2].contains('\u{fffd}'));

    // First config is the huge one (not parsed); make the malformed YAML first.
    let mut c = ns.command(workspace_bin("daprd").unwrap());
    c.args([
        "--app-id",
        "bad",
        "--dapr-http-port",
        "3700",
        "--dapr-grpc-port",
        "50003",
    ])
    .arg("--config")
    .arg(&bad_yaml);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let d2 = Owned::new("bad yaml stand-in", c.spawn().unwrap());
    let evs = v
        .wait_for("bad yaml measured", WAIT, |e| {
            !measurements(e, d2.pid()).is_empty()
        })
        .unwrap();
    let m = measurements(&evs, d2.pid()).pop().unwrap();
    assert!(
        m.errors.iter().any(|e| e.contains("config")),
        "{:?}",
        m.errors
    );
    assert!(m.files[0].sha256.is_some());

    // Processes that exit mid-scan: a burst of short-lived stand-ins.
    let mut kids = Vec::new();
    for i in 0..40 {
        let mut c = ns.command(workspace_bin("daprd").unwrap());
        c.args([
            "--exit-after-ms",
            "1",
            "--dapr-http-port",
            &(4000 + i).to_string(),
            "--dapr-grpc-port",
            &(5000 + i).to_string(),
        ]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        kids.push(Owned::new("short-lived", c.spawn().unwrap()));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(v.running(), "vouchd died");
    // And it still measures new instances afterwards.
    let ns3 = Netns::new().unwrap();
    let d3 = standin(&ns3, &["--app-id", "after"], &[]);
    v.wait_for("measured after the storm", WAIT, |e| {
        !measurements(e, d3.pid()).is_empty()
    })
    .unwrap();
    drop(kids);
    v.stop();
    assert_replays(&sw, &v);
}
