//! A stand-in daprd inside a real containerd container (private containerd,
//! image built locally, no registry) is measured with its container ID,
//! image name and manifest digest, and its files are read from inside the
//! container.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::time::Duration;

use vouch_proto::measurement::measurement_of;
use vouch_tests::containerd::Containerd;
use vouch_tests::proc::workspace_bin;
use vouch_tests::require_tools;
use vouch_tests::swtpm::Swtpm;
use vouch_tests::vouchd::Vouchd;

#[test]
fn standin_in_containerd_container_is_measured_with_image_digest() {
    if !require_tools(&["containerd", "ctr", "runc", "swtpm", "tar", "gzip", "ldd"]) {
        return;
    }
    let sw = Swtpm::start().unwrap();
    let mut ctrd = Containerd::start().unwrap();
    let inside_cfg = b"apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: in-container\nspec:\n  mtls:\n    enabled: true\n";
    let comp = b"apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: statestore\n";
    let image = "docker.io/library/vouch-standin:test";
    let digest = ctrd
        .build_and_import(
            image,
            &[(workspace_bin("daprd").unwrap(), "/usr/local/bin/daprd")],
            &[
                ("/etc/dapr/config.yaml", inside_cfg),
                ("/components/statestore.yaml", comp),
            ],
        )
        .unwrap();

    let mut v = Vouchd::new(&sw, &sw.scratch().join("state"))
        .env("VOUCHD_CONTAINERD_SOCKET", ctrd.socket().to_str().unwrap())
        .env("VOUCHD_CONTAINERD_NAMESPACES", "default");
    v.start().unwrap();
    let id = format!("vouch-standin-{}", std::process::id());
    ctrd.run(
        image,
        &id,
        &[
            "/usr/local/bin/daprd",
            "--app-id",
            "in-ctr",
            "--config",
            "/etc/dapr/config.yaml",
            "--resources-path",
            "/components",
        ],
    )
    .unwrap();
    let pid = ctrd.pid(&id).unwrap();
    let evs = v
        .wait_for(
            "container instance measured",
            Duration::from_secs(20),
            |e| {
                e.iter().filter_map(|e| measurement_of(e).ok()).any(|m| {
                    m.id.pid == pid
                        && m.container
                            .as_ref()
                            .is_some_and(|c| c.image_digest.is_some())
                })
            },
        )
        .unwrap();
    let m = evs
        .iter()
        .filter_map(|e| measurement_of(e).ok())
        .rfind(|m| m.id.pid == pid)
        .unwrap();
    let c = m.container.clone().unwrap();
    assert_eq!(c.id, id);
    assert_eq!(c.runtime_namespace.as_deref(), Some("default"));
    assert_eq!(c.image.as_deref(), Some(image));
    assert_eq!(c.image_digest.as_deref(), Some(digest.as_str()), "{c:?}");
    // Files as the container sees them (the host has no such files).
    assert!(!std::path::Path::new("/components/statestore.yaml").exists());
    assert_eq!(m.files[0].path, "/etc/dapr/config.yaml");
    assert_eq!(
        m.files[0].sha256.as_deref(),
        Some(hex::encode(vouch_proto::event::digest(inside_cfg)).as_str())
    );
    assert_eq!(m.files[1].path, "/components/statestore.yaml");
    assert_eq!(
        m.files[1].sha256.as_deref(),
        Some(hex::encode(vouch_proto::event::digest(comp)).as_str())
    );
    assert_eq!(m.config_mtls_enabled, Some(true));
    assert_eq!(m.exe.path, "/usr/local/bin/daprd");
    assert_eq!(
        m.exe.sha256.as_deref(),
        Some(
            hex::encode(vouch_proto::event::digest(
                &std::fs::read(workspace_bin("daprd").unwrap()).unwrap()
            ))
            .as_str()
        )
    );
}
