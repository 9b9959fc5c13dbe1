//! `vouchd`: the per-node Vouch daemon.
//!
//! This binary sets up logging and configuration and dispatches to the
//! library. `vouchd tpm ...` commands expose the TPM layer (EK, AK, quotes,
//! credential activation) for enrollment tooling, tests and the demo.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use vouch_daemon::config::{Config, LogFormat};
use vouch_daemon::daemon::{Daemon, TpmPcr};
use vouch_daemon::measure::Measurer;
use vouch_daemon::tpm::{Ak, Ek, Tpm};

#[derive(Parser, Debug)]
#[command(
    name = "vouchd",
    version,
    about = "Vouch node daemon: TPM-rooted attestation of Dapr sidecars"
)]
struct Cli {
    /// TOML configuration file (VOUCHD_* environment variables override it).
    #[arg(long, short, global = true, env = "VOUCHD_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines (overrides log_format).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// TPM operations: identity, quotes, credential activation.
    #[command(subcommand)]
    Tpm(TpmCommand),
    /// One scan of the node, no TPM needed: every daprd instance with its
    /// measurements and anomalies (raw material for policies).
    Measure {
        /// Print JSON (default: one line per instance and anomaly).
        #[arg(long)]
        json: bool,
    },
    /// The long-running daemon: discover and measure every daprd into the
    /// TPM-backed runtime log.
    Run,
}

#[derive(Subcommand, Debug)]
enum TpmCommand {
    /// Print the TPM, EK (with certificate) and AK as JSON; creates and
    /// persists the AK on first use.
    Info,
    /// Quote the boot PCRs 0-7 and the runtime PCR with a hex nonce; JSON.
    Quote {
        /// Qualifying data (hex, at most 64 bytes; 32 recommended).
        #[arg(long)]
        nonce: String,
    },
    /// Activate a credential made for this TPM's EK and AK; prints the
    /// secret as JSON.
    Activate {
        /// TPM2B_ID_OBJECT body (hex).
        #[arg(long)]
        id_object: String,
        /// TPM2B_ENCRYPTED_SECRET body (hex).
        #[arg(long)]
        encrypted_secret: String,
    },
    /// Extend a SHA-256 digest (hex) into the runtime PCR.
    Extend {
        /// 32-byte digest (hex).
        #[arg(long)]
        digest: String,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VOUCHD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn open(cfg: &Config) -> Result<(Tpm, Ek, Ak)> {
    let mut tpm = Tpm::open(&cfg.tcti)?;
    let info = tpm.info()?;
    if info.software {
        tracing::warn!(
            manufacturer = %info.manufacturer,
            vendor = %info.vendor,
            "SOFTWARE TPM IN USE: attestation from this node proves nothing about its hardware; use only for tests and demos"
        );
    }
    let ek = tpm.load_ek(cfg.ek)?;
    let ak = tpm
        .load_or_create_ak(&ek, &cfg.state_dir, cfg.ak)
        .with_context(|| format!("AK in state directory {}", cfg.state_dir.display()))?;
    if ak.created {
        tracing::info!(ak_name = %hex::encode(&ak.name), "created and persisted a new AK");
    } else {
        tracing::info!(ak_name = %hex::encode(&ak.name), "loaded the persisted AK");
    }
    Ok((tpm, ek, ak))
}

fn containerd_resolver(cfg: &Config) -> Option<vouch_daemon::containerd::Containerd> {
    cfg.containerd_socket
        .exists()
        .then(|| vouch_daemon::containerd::Containerd::new(cfg.containerd_socket.clone()))
}

fn hex_arg(name: &str, v: &str) -> Result<Vec<u8>> {
    hex::decode(v.trim()).with_context(|| format!("--{name} is not valid hex"))
}

/// Starts credential serving (Workload API, Sentry endpoint, the
/// verifier's Watch stream, Sentry token files) on its own runtime.
fn serve_credentials(
    cfg: &Config,
    url: &str,
    ca: &std::path::Path,
    kick: Box<dyn Fn() + Send + Sync>,
) -> Result<(
    tokio::runtime::Runtime,
    std::sync::Arc<vouch_daemon::creds::Creds>,
)> {
    use vouch_daemon::{creds::Creds, sentry, serve, workload};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vouchd-creds")
        .enable_all()
        .build()?;
    let ca_pem = std::fs::read(ca).with_context(|| format!("verifier_ca {}", ca.display()))?;
    let endpoint = vouch_proto::client::verifier_endpoint(url, &ca_pem)?
        .connect_timeout(std::time::Duration::from_secs(3));
    let _g = rt.enter();
    let creds = std::sync::Arc::new(Creds::new(endpoint.connect_lazy(), kick, &cfg.serve));
    let wl = serve::bind(&cfg.serve.workload_socket, cfg.serve.workload_gid)
        .with_context(|| format!("workload_socket {}", cfg.serve.workload_socket.display()))?;
    let sl = serve::bind(&cfg.serve.sentry_socket, cfg.serve.workload_gid)
        .with_context(|| format!("sentry_socket {}", cfg.serve.sentry_socket.display()))?;
    let api = workload::WorkloadApi {
        creds: creds.clone(),
    };
    rt.spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(
                vouch_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(
                    api,
                ),
            )
            .serve_with_incoming(serve::incoming(wl))
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "Workload API stopped");
        }
    });
    tracing::info!(workload = %cfg.serve.workload_socket.display(), sentry = %cfg.serve.sentry_socket.display(), bundle = %cfg.serve.bundle_file.display(), "serving credentials to attested sidecars");
    rt.spawn(sentry::run(creds.clone(), sl));
    rt.spawn(creds.clone().watch_loop());
    rt.spawn(creds.clone().token_loop());
    drop(_g);
    Ok((rt, creds))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let cfg = Config::load(cli.config.as_deref())?;
    init_logging(if cli.log_json {
        LogFormat::Json
    } else {
        cfg.log_format
    });
    match cli.command {
        Command::Measure { json } => {
            let mut measurer = Measurer::new(cfg.measure.clone());
            let mut resolver = containerd_resolver(&cfg);
            let r = resolver
                .as_mut()
                .map(|r| r as &mut dyn vouch_daemon::measure::ImageResolver);
            let (instances, anomalies) = vouch_daemon::daemon::measure_once(&mut measurer, r);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "instances": instances,
                        "anomalies": anomalies,
                    }))?
                );
            } else {
                for m in &instances {
                    println!(
                        "daprd pid {} app-id {} exe {} sha256 {} netns {} listeners {}",
                        m.id.pid,
                        m.flags.app_id.as_deref().unwrap_or("-"),
                        m.exe.path,
                        m.exe.sha256.as_deref().unwrap_or("?"),
                        m.netns,
                        m.listeners.len()
                    );
                }
                for a in &anomalies {
                    println!("ANOMALY {:?}: {}", a.kind, a.detail);
                }
            }
        }
        Command::Run => {
            let (tpm, ek, ak) = open(&cfg)?;
            let pcr = TpmPcr {
                tpm,
                ak,
                index: cfg.runtime_pcr,
            };
            let resolver = containerd_resolver(&cfg)
                .map(|r| Box::new(r) as Box<dyn vouch_daemon::measure::ImageResolver>);
            let mut daemon = Daemon::new(
                pcr,
                &cfg.state_dir,
                Measurer::new(cfg.measure.clone()),
                resolver,
                cfg.rescan_interval,
            )?;
            if let Some((url, ca)) = &cfg.verifier {
                let pusher = vouch_daemon::push::Pusher::new(
                    url,
                    ca,
                    &cfg.state_dir,
                    cfg.node_name.clone(),
                    cfg.node_labels.clone(),
                )?;
                daemon = daemon.with_uplink(vouch_daemon::daemon::Uplink {
                    pusher,
                    ek,
                    heartbeat: cfg.heartbeat,
                    coalesce: std::time::Duration::from_millis(20),
                });
            }
            if let vouch_daemon::runlog::LogState::IntegrityLost { reason } = daemon.log_state() {
                tracing::error!(%reason, "runtime log integrity LOST for this boot; the verifier will treat this node as failed");
            }
            let serving = match &cfg.verifier {
                Some((url, ca)) => {
                    let (rt, creds) = serve_credentials(&cfg, url, ca, daemon.kicker())?;
                    daemon = daemon.with_creds(creds);
                    Some(rt)
                }
                None => None,
            };
            let result = daemon.run();
            if let Some(rt) = serving {
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
                let _ = std::fs::remove_file(&cfg.serve.workload_socket);
                let _ = std::fs::remove_file(&cfg.serve.sentry_socket);
            }
            result?;
        }
        Command::Tpm(cmd) => {
            let (mut tpm, ek, ak) = open(&cfg)?;
            let out = match cmd {
                TpmCommand::Info => serde_json::json!({
                    "tpm": tpm.info()?,
                    "ek": {
                        "kind": ek.kind,
                        "public": hex::encode(&ek.public),
                        "certificate": hex::encode(&ek.certificate),
                        "chain": ek.chain.iter().map(hex::encode).collect::<Vec<_>>(),
                    },
                    "ak": {
                        "public": hex::encode(&ak.public),
                        "name": hex::encode(&ak.name),
                        "created": ak.created,
                    },
                    "runtime_pcr": cfg.runtime_pcr,
                }),
                TpmCommand::Quote { nonce } => {
                    let nonce = hex_arg("nonce", &nonce)?;
                    let mut pcrs = vouch_proto::BOOT_PCRS.to_vec();
                    pcrs.push(cfg.runtime_pcr);
                    serde_json::to_value(tpm.quote(&ak, &nonce, &pcrs)?)?
                }
                TpmCommand::Activate {
                    id_object,
                    encrypted_secret,
                } => {
                    let secret = tpm.activate_credential(
                        &ak,
                        &ek,
                        &hex_arg("id-object", &id_object)?,
                        &hex_arg("encrypted-secret", &encrypted_secret)?,
                    )?;
                    serde_json::json!({ "secret": hex::encode(secret) })
                }
                TpmCommand::Extend { digest } => {
                    let d = hex_arg("digest", &digest)?;
                    let d: [u8; 32] = d
                        .try_into()
                        .map_err(|_| anyhow::anyhow!("--digest must be 32 bytes"))?;
                    tpm.pcr_extend(cfg.runtime_pcr, &d)?;
                    serde_json::json!({ "extended": cfg.runtime_pcr })
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(())
}
