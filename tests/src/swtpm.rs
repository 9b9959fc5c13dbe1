//! A private swtpm per test: manufactured with EK certificates (RSA-2048 and
//! ECC P-384) from a local CA created for this instance alone, served on
//! free loopback ports, killed by PID on drop.
//!
//! No fixed ports and no global lock: tests run in parallel, each with its
//! own state directory.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::proc::{run_ok, Owned};

/// A running swtpm with its own manufactured state and local CA.
#[derive(Debug)]
pub struct Swtpm {
    dir: tempfile::TempDir,
    port: u16,
    proc: Option<Owned>,
}

fn free_port_pair() -> Result<u16> {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0")?;
        let port = a.local_addr()?.port();
        if port == u16::MAX {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free pair of loopback ports")
}

impl Swtpm {
    /// Manufactures a fresh TPM (EK certificates from a private local CA)
    /// and starts serving it.
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("vouch-swtpm-").tempdir()?;
        let root = dir.path();
        let (state, ca) = (root.join("state"), root.join("ca"));
        std::fs::create_dir_all(&state)?;
        std::fs::create_dir_all(&ca)?;
        std::fs::write(
            root.join("localca.conf"),
            format!(
                "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n",
                ca = ca.display()
            ),
        )?;
        std::fs::write(root.join("localca.options"), "")?;
        std::fs::write(
            root.join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {r}/localca.conf\ncreate_certs_tool_options = {r}/localca.options\nactive_pcr_banks = sha256\n",
                r = root.display()
            ),
        )?;
        run_ok(
            Command::new("swtpm_setup")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(&state)
                .arg("--config")
                .arg(root.join("swtpm_setup.conf"))
                .args(["--create-ek-cert", "--lock-nvram"])
                .stdout(Stdio::null()),
        )
        .context("swtpm_setup (manufacturing the test TPM)")?;
        let mut me = Self {
            dir,
            port: 0,
            proc: None,
        };
        me.serve()?;
        Ok(me)
    }

    fn serve(&mut self) -> Result<()> {
        let state = self.dir.path().join("state");
        for _ in 0..5 {
            let port = free_port_pair()?;
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawn swtpm")?;
            let mut owned = Owned::new("swtpm", child);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if owned.exited() {
                    break; // port taken in between; try another pair
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    self.port = port;
                    self.proc = Some(owned);
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        bail!("swtpm did not start serving")
    }

    /// TCTI string for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// PID of the running swtpm.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Owned::pid)
    }

    /// The local CA's root certificate (PEM).
    pub fn ca_root(&self) -> PathBuf {
        self.dir.path().join("ca/swtpm-localca-rootca-cert.pem")
    }

    /// The local CA's intermediate (issuer) certificate (PEM).
    pub fn ca_issuer(&self) -> PathBuf {
        self.dir.path().join("ca/issuercert.pem")
    }

    /// A scratch directory that lives as long as this swtpm.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Power-cycles the TPM: stops swtpm and serves the same state again.
    /// PCRs reset and resetCount increments, as on a reboot.
    pub fn reboot(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
        self.serve()
    }
}
