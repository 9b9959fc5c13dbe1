//! `vouch-verifier`: the central Vouch verifier.
//!
//! Built and run without libtss2: every TPM structure is checked with
//! vouch-proto's pure-Rust codecs. For now it offers offline evidence
//! checks; enrollment, appraisal and credential issuance build on them.

use std::path::PathBuf;

/// mimalloc instead of glibc's malloc: gRPC/TLS and appraisal allocate many
/// short-lived buffers across tokio's worker threads, where glibc's arenas
/// cost about a seventh of the verifier's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vouch_proto::name::ak_qualified_name;
use vouch_proto::quote::{verify_quote, AkVerifier, Expectation, QuoteFile};
use vouch_proto::tpm::Public;

#[derive(Parser, Debug)]
#[command(
    name = "vouch-verifier",
    version,
    about = "Vouch verifier: TPM-rooted attestation of Dapr sidecars"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Validate policy files; errors name the file, line and field.
    Check {
        /// Policy YAML files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Turn `vouchd measure --json` output into a starting policy that pins
    /// what it saw (daprd digests, images, files, posture, placement).
    Generate {
        /// The measure output (default: standard input).
        #[arg(long)]
        input: Option<PathBuf>,
        /// metadata.name of the generated policy.
        #[arg(long, default_value = "generated")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the verifier (gRPC over TLS).
    Serve {
        /// TOML configuration (VOUCH_VERIFIER_* variables override it).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Every enrolled node.
    Nodes {
        /// The verifier's state database.
        #[arg(long, default_value = "/var/lib/vouch-verifier/state.db")]
        db: PathBuf,
    },
    /// What runs where: every sidecar's verdict and failed rules.
    Sidecars {
        /// The verifier's state database.
        #[arg(long, default_value = "/var/lib/vouch-verifier/state.db")]
        db: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Why a sidecar has its verdict: every rule, measured vs allowed.
    Explain {
        /// Sidecar: pid@start, app id, or node/pid@start.
        sidecar: String,
        /// The verifier's state database.
        #[arg(long, default_value = "/var/lib/vouch-verifier/state.db")]
        db: PathBuf,
    },
    /// Policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Verify a quote offline from a JSON evidence file with fields
    /// ek_public, ak_public, nonce, attest, signature (hex) and pcrs
    /// (as in test-data/quotes/*.json).
    VerifyQuote {
        /// The evidence file.
        file: PathBuf,
    },
}

fn init_logging(json: bool) {
    let b = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VOUCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    if json {
        b.json().init()
    } else {
        b.init()
    }
}

fn serve(config: Option<PathBuf>) -> Result<()> {
    use vouch_verifier::{config::Config, enroll::EkTrust, policy, service, store, tls};
    let cfg = Config::load(config.as_deref())?;
    init_logging(cfg.log_json);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state dir {}", cfg.state_dir.display()))?;
    let mut trust = EkTrust {
        allowlist: cfg.ek_allowlist.iter().map(|s| s.to_lowercase()).collect(),
        tofu: cfg.trust_on_first_use,
        ..Default::default()
    };
    for b in &cfg.ek_ca_bundles {
        let n = trust.add_pem_bundle(b).map_err(anyhow::Error::msg)?;
        tracing::info!(bundle = %b.display(), certificates = n, "TPM manufacturer CAs loaded");
    }
    if trust.tofu {
        tracing::warn!(
            "TRUST ON FIRST USE is on: EKs without a trusted certificate are accepted once"
        );
    }
    let policies = policy::load_dir(&cfg.policy_dir)?;
    tracing::info!(dir = %cfg.policy_dir.display(), policies = policies.len(), "policies loaded");
    let st = store::SqliteStore::open(&cfg.state_dir.join("state.db"))?;
    let signer = std::sync::Arc::new(vouch_verifier::ear::EarSigner::load_or_create(
        &cfg.state_dir.join("ear.key"),
    )?);
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let ca = vouch_verifier::ca::IssuingCa::load_or_create(
        &cfg.state_dir.join("svid-ca"),
        cfg.ca_ttl,
        unix_now,
    )?;
    let verifier = std::sync::Arc::new(service::Verifier::new(
        Box::new(st),
        service::Settings {
            trust,
            nonce_ttl: cfg.nonce_ttl,
            creds: cfg.creds.clone(),
        },
        policies,
        ca,
        signer.clone(),
    )?);
    tracing::info!(trust_domain = %cfg.creds.trust_domain, sentry_id = %cfg.creds.sentry_id, svid_ttl_s = cfg.creds.svid_ttl.as_secs(), "credential issuance");
    // Reload policies on change; a bad edit keeps the last good set.
    let v2 = verifier.clone();
    let dir = cfg.policy_dir.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            match policy::load_dir(&dir) {
                Ok(p) => {
                    tracing::info!(policies = p.len(), "policies reloaded");
                    v2.set_policies(p);
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy reload failed; the last good policies stay in force")
                }
            }
        }
    })?;
    notify::Watcher::watch(
        &mut watcher,
        &cfg.policy_dir,
        notify::RecursiveMode::NonRecursive,
    )?;
    let (cert, key) = tls::load_or_create(&cfg.state_dir, &cfg.tls_names)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let http_listener = {
        let _g = rt.enter();
        let std_l = std::net::TcpListener::bind(cfg.http_listen)
            .with_context(|| format!("http_listen {}", cfg.http_listen))?;
        std_l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std_l)?
    };
    tracing::info!(listen = %cfg.http_listen, "operator API and JWKS (HTTP)");
    rt.spawn(vouch_verifier::http::serve(
        http_listener,
        verifier.clone(),
        signer,
    ));
    let stale_after = cfg.stale_after;
    let v3 = verifier.clone();
    rt.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            if let Err(e) = v3.expire_stale(stale_after) {
                tracing::error!(error = %e, "stale-node check failed");
            }
        }
    });
    if !cfg.webhooks.is_empty() {
        let targets = cfg
            .webhooks
            .iter()
            .map(|w| vouch_verifier::webhook::Target::parse(w))
            .collect::<Result<Vec<_>, _>>()?;
        let _g = rt.enter();
        verifier.set_event_sink(vouch_verifier::webhook::start(targets));
        tracing::info!(webhooks = ?cfg.webhooks, "verdict changes are posted to webhooks");
    }
    let v4 = verifier.clone();
    let rotate_check = (cfg.ca_ttl / 10).min(std::time::Duration::from_secs(30));
    rt.spawn(async move {
        let mut tick = tokio::time::interval(rotate_check);
        loop {
            tick.tick().await;
            if let Err(e) = v4.rotate_ca() {
                tracing::error!(error = %e, "SVID CA rotation failed");
            }
        }
    });
    rt.block_on(async move {
        let creds = vouch_proto::api::credentials_server::CredentialsServer::new(
            service::CredentialService(verifier.clone()),
        );
        let svc = vouch_proto::api::attestation_server::AttestationServer::from_arc(verifier)
            .max_decoding_message_size(vouch_verifier::service::MAX_MESSAGE);
        tracing::info!(listen = %cfg.listen, ca = %cfg.state_dir.join("ca.pem").display(), "vouch-verifier serving");
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key)))?
            .add_service(svc)
            .add_service(creds)
            .serve_with_shutdown(cfg.listen, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok::<(), anyhow::Error>(())
    })?;
    drop(watcher);
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Serve { config } = cli.command {
        return serve(config);
    }
    init_logging(false);
    match cli.command {
        Command::Serve { .. } => {}
        Command::Nodes { db } => {
            use vouch_verifier::store::Store;
            let st = vouch_verifier::store::SqliteStore::open_read_only(&db)?;
            for (n, s) in st.load()? {
                println!(
                    "{} {} trust={} labels={:?} boot={:?} next_seq={}",
                    n.node_id,
                    n.name,
                    n.trust,
                    n.labels,
                    s.as_ref().and_then(|s| s.boot),
                    s.as_ref().map_or(0, |s| s.next_seq)
                );
            }
        }
        Command::Sidecars { db, json } => {
            use vouch_verifier::store::Store;
            let rows = vouch_verifier::store::SqliteStore::open_read_only(&db)?.verdicts()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for r in rows {
                    let failed: Vec<String> = r
                        .reasons
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter(|x| x["ok"] == false)
                                .filter_map(|x| x["rule"].as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                    println!(
                        "{}/{} app-id={} ns={} {} {}",
                        r.node_name,
                        r.instance,
                        r.app_id.as_deref().unwrap_or("-"),
                        r.namespace,
                        r.verdict.to_uppercase(),
                        if failed.is_empty() {
                            String::new()
                        } else {
                            format!("failed: {}", failed.join(", "))
                        }
                    );
                }
            }
        }
        Command::Explain { sidecar, db } => {
            use vouch_verifier::store::Store;
            let rows = vouch_verifier::store::SqliteStore::open_read_only(&db)?.verdicts()?;
            let hits: Vec<_> = rows
                .iter()
                .filter(|r| {
                    r.instance == sidecar
                        || r.app_id.as_deref() == Some(sidecar.as_str())
                        || format!("{}/{}", r.node_name, r.instance) == sidecar
                })
                .collect();
            if hits.is_empty() {
                anyhow::bail!("no sidecar {sidecar:?} (try `vouch-verifier sidecars`)");
            }
            for r in hits {
                println!(
                    "{}/{} app-id={} namespace={}: {}",
                    r.node_name,
                    r.instance,
                    r.app_id.as_deref().unwrap_or("-"),
                    r.namespace,
                    r.verdict.to_uppercase()
                );
                for x in r.reasons.as_array().into_iter().flatten() {
                    println!(
                        "  [{}] {} (policy {}): measured {} ; allowed {}",
                        if x["ok"] == true { "ok" } else { "FAIL" },
                        x["rule"].as_str().unwrap_or("?"),
                        x["policy"].as_str().unwrap_or("-"),
                        x["measured"].as_str().unwrap_or(""),
                        x["expected"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Command::Policy(PolicyCommand::Check { files }) => {
            let mut failed = 0;
            for f in &files {
                match vouch_verifier::policy::Policy::load(f) {
                    Ok(p) => println!(
                        "{}: ok (policy {:?}, mode {:?})",
                        f.display(),
                        p.metadata.name,
                        p.spec.mode
                    ),
                    Err(e) => {
                        eprintln!("{e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} policy files invalid", files.len());
            }
        }
        Command::Policy(PolicyCommand::Generate { input, name }) => {
            let text = match &input {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => {
                    std::io::read_to_string(std::io::stdin()).context("reading standard input")?
                }
            };
            let policy = vouch_verifier::policy::generate(&text, &name)?;
            print!("{}", serde_yaml::to_string(&policy)?);
        }
        Command::VerifyQuote { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let q: QuoteFile = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a quote evidence file", file.display()))?;
            let ek = Public::parse(&q.ek_public).context("ek_public (TPMT_PUBLIC)")?;
            let ak = Public::parse(&q.ak_public).context("ak_public (TPMT_PUBLIC)")?;
            let qn = ak_qualified_name(&ek, &ak)?;
            let attest = verify_quote(
                &AkVerifier::new(&ak)?,
                &q.attest,
                &q.signature,
                &q.pcrs,
                Expectation {
                    nonce: &q.nonce,
                    qualified_signer: Some(&qn),
                },
            )
            .with_context(|| format!("{}: quote rejected", file.display()))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "verified": true,
                    "clock_info": attest.clock_info,
                    "pcrs": q.pcrs,
                }))?
            );
        }
    }
    Ok(())
}
