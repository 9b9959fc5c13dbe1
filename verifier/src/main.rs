//! `vouch-verifier`: the central Vouch verifier.
//!
//! Built and run without libtss2: every TPM structure is checked with
//! vouch-proto's pure-Rust codecs. For now it offers offline evidence
//! checks; enrollment, appraisal and credential issuance build on them.

use std::path::PathBuf;

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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VOUCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
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
