//! A private containerd for one test (own root, state and socket), an OCI
//! image built locally without a registry, and containers cleaned up on
//! drop. The daemon process is stopped by its PID.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::proc::{run_ok, Owned};

/// A running private containerd.
#[derive(Debug)]
pub struct Containerd {
    dir: tempfile::TempDir,
    proc: Option<Owned>,
    containers: Vec<String>,
    /// containerd namespace used for everything here.
    pub namespace: String,
}

fn sha256_file(p: &Path) -> Result<(String, u64)> {
    let b = std::fs::read(p)?;
    Ok((hex::encode(vouch_proto::event::digest(&b)), b.len() as u64))
}

impl Containerd {
    /// Starts containerd with root, state and socket in a fresh directory.
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("vouch-ctrd-").tempdir()?;
        let d = dir.path();
        let cfg = d.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{r}/containerd.sock\"\n[ttrpc]\n  address = \"{r}/containerd.sock.ttrpc\"\n",
                r = d.display()
            ),
        )?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(d.join("containerd.log")).map_or(Stdio::null(), Stdio::from),
            )
            .spawn()
            .context("spawn containerd")?;
        let me = Self {
            dir,
            proc: Some(Owned::new("containerd", child)),
            containers: Vec::new(),
            namespace: "default".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Command::new("ctr")
            .arg("-a")
            .arg(me.socket())
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            if Instant::now() > deadline {
                bail!("containerd did not answer on {}", me.socket().display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a")
            .arg(self.socket())
            .arg("-n")
            .arg(&self.namespace);
        c
    }

    /// Builds an OCI image layout tar holding `files` (host path ->
    /// path in the image, plus the shared libraries of any ELF among them),
    /// imports it as `name`, and returns the manifest digest (sha256:...).
    pub fn build_and_import(
        &self,
        name: &str,
        files: &[(PathBuf, &str)],
        extra: &[(&str, &[u8])],
    ) -> Result<String> {
        let work = self.dir.path().join("image");
        let rootfs = work.join("rootfs");
        let blobs = work.join("layout/blobs/sha256");
        std::fs::create_dir_all(&rootfs)?;
        std::fs::create_dir_all(&blobs)?;
        let put = |src: &Path, dst: &str| -> Result<()> {
            let to = rootfs.join(dst.trim_start_matches('/'));
            if let Some(p) = to.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::copy(src, &to).with_context(|| format!("copy {}", src.display()))?;
            Ok(())
        };
        for (src, dst) in files {
            put(src, dst)?;
            // Dynamic executables need their loader and libraries.
            if let Ok(out) = run_ok(Command::new("ldd").arg(src)) {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    let lib = line
                        .split_whitespace()
                        .find(|w| w.starts_with('/'))
                        .map(PathBuf::from);
                    if let Some(lib) = lib {
                        let real = std::fs::canonicalize(&lib)?;
                        put(&real, &lib.to_string_lossy())?;
                    }
                }
            }
        }
        for (dst, content) in extra {
            let to = rootfs.join(dst.trim_start_matches('/'));
            if let Some(p) = to.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::write(&to, content)?;
        }
        let layer_tar = work.join("layer.tar");
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&layer_tar)
                .arg("."),
        )?;
        let (diff_id, _) = sha256_file(&layer_tar)?;
        run_ok(Command::new("gzip").arg("-n").arg("-f").arg(&layer_tar))?;
        let layer_gz = work.join("layer.tar.gz");
        let (layer_digest, layer_size) = sha256_file(&layer_gz)?;
        std::fs::rename(&layer_gz, blobs.join(&layer_digest))?;

        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        });
        let config_bytes = serde_json::to_vec(&config)?;
        let config_digest = hex::encode(vouch_proto::event::digest(&config_bytes));
        std::fs::write(blobs.join(&config_digest), &config_bytes)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config_bytes.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
        });
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let manifest_digest = hex::encode(vouch_proto::event::digest(&manifest_bytes));
        std::fs::write(blobs.join(&manifest_digest), &manifest_bytes)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_digest}"),
                "size": manifest_bytes.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": name},
            }],
        });
        std::fs::write(work.join("layout/index.json"), serde_json::to_vec(&index)?)?;
        std::fs::write(
            work.join("layout/oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let image_tar = work.join("image.tar");
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(work.join("layout"))
                .arg("-cf")
                .arg(&image_tar)
                .arg("."),
        )?;
        run_ok(self.ctr().args(["images", "import"]).arg(&image_tar))?;
        Ok(format!("sha256:{manifest_digest}"))
    }

    /// Runs `image` as container `id` (detached) with `args`.
    pub fn run(&mut self, image: &str, id: &str, args: &[&str]) -> Result<()> {
        run_ok(
            self.ctr()
                .args(["run", "-d", "--snapshotter", "overlayfs", image, id])
                .args(args)
                .stdout(Stdio::null()),
        )?;
        self.containers.push(id.to_owned());
        Ok(())
    }

    /// The host pid of container `id`'s task.
    pub fn pid(&self, id: &str) -> Result<u32> {
        let out = run_ok(self.ctr().args(["task", "ls"]))?;
        for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.first() == Some(&id) {
                return Ok(f.get(1).context("no pid column")?.parse()?);
            }
        }
        bail!("no task for container {id}")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.containers) {
            let _ = self
                .ctr()
                .args(["task", "kill", "-s", "SIGKILL", &id])
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(100));
            let _ = self
                .ctr()
                .args(["task", "delete", "-f", &id])
                .stderr(Stdio::null())
                .status();
            let _ = self
                .ctr()
                .args(["container", "delete", &id])
                .stderr(Stdio::null())
                .status();
            // Leftover (empty) cgroup directories of the container.
            if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
                for c in rd.flatten() {
                    let _ = std::fs::remove_dir(c.path().join(&self.namespace).join(&id));
                    // The namespace's parent directory, if nothing else uses it.
                    let _ = std::fs::remove_dir(c.path().join(&self.namespace));
                }
            }
        }
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }
}
