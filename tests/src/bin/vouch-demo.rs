//! `vouch-demo`: Vouch's main job on one machine, with a private swtpm.
//!
//! Today (foundation): an enroll-style round trip between a node and a
//! verifier. vouchd (a real process, on a freshly manufactured swtpm with EK
//! certificates) creates and persists an AK; the verifier side (vouch-proto,
//! pure Rust) makes a credential for that EK and AK Name; vouchd activates
//! it; vouchd quotes PCRs 0-7 and the runtime PCR over a fresh nonce; the
//! verifier checks signature, nonce, qualified signer and PCR digest, and
//! shows that a tampered PCR value is caught. Everything is cleaned up.

use std::process::Command;

use anyhow::{bail, Context, Result};
use ring::rand::SecureRandom;
use vouch_proto::credential::make_credential;
use vouch_proto::name::ak_qualified_name;
use vouch_proto::quote::{verify_quote, AkVerifier, Expectation, QuoteError};
use vouch_proto::tpm::Public;
use vouch_tests::proc::{run_ok, workspace_bin};
use vouch_tests::swtpm::Swtpm;

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("system random source failed"))?;
    Ok(b)
}

type QuoteOut = vouch_proto::quote::QuoteJson;

fn field<'a>(v: &'a serde_json::Value, path: &[&str]) -> Result<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .with_context(|| format!("vouchd output lacks {}", path.join(".")))?;
    }
    cur.as_str()
        .with_context(|| format!("{} is not a string", path.join(".")))
}

fn main() -> Result<()> {
    let vouchd = workspace_bin("vouchd")?;
    println!("== Vouch demo: enroll-style round trip on a private swtpm ==\n");
    let sw = Swtpm::start().context("starting swtpm (run scripts/setup.sh)")?;
    println!(
        "[node]     swtpm manufactured with EK certificates from a private local CA (pid {}, {})",
        sw.pid(),
        sw.tcti()
    );
    let state = sw.scratch().join("vouchd-state");
    let vouchd_run = |args: &[&str]| -> Result<serde_json::Value> {
        let out = run_ok(
            Command::new(&vouchd)
                .args(args)
                .env("VOUCHD_TCTI", sw.tcti())
                .env("VOUCHD_STATE_DIR", &state)
                .env("VOUCHD_LOG", "warn")
                .env("TSS2_LOG", "all+none"),
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };

    let info = vouchd_run(&["tpm", "info"])?;
    let ek_pub = Public::parse(&hex::decode(field(&info, &["ek", "public"])?)?)?;
    let ak_pub = Public::parse(&hex::decode(field(&info, &["ak", "public"])?)?)?;
    let ak_name = hex::decode(field(&info, &["ak", "name"])?)?;
    println!(
        "[vouchd]   EK {} with a {}-byte certificate from NV; AK created and persisted (0600) in {}",
        info["ek"]["kind"],
        field(&info, &["ek", "certificate"])?.len() / 2,
        state.display()
    );
    println!("[vouchd]   AK name {}", hex::encode(&ak_name));

    let secret = random::<32>()?;
    let cred = make_credential(&ek_pub, &ak_name, &secret)?;
    println!(
        "[verifier] MakeCredential (pure Rust) for that EK and AK name: {}-byte blob",
        cred.id_object.len()
    );
    let act = vouchd_run(&[
        "tpm",
        "activate",
        "--id-object",
        &hex::encode(&cred.id_object),
        "--encrypted-secret",
        &hex::encode(&cred.encrypted_secret),
    ])?;
    if hex::decode(field(&act, &["secret"])?)? != secret {
        bail!("activated secret differs: the AK is not bound to this EK");
    }
    println!("[vouchd]   ActivateCredential returned the secret: AK and EK live in the same TPM ✔");

    let nonce = random::<32>()?;
    let q: QuoteOut = serde_json::from_value(vouchd_run(&[
        "tpm",
        "quote",
        "--nonce",
        &hex::encode(nonce),
    ])?)?;
    println!("[vouchd]   quoted PCRs {:?} over the verifier's nonce (a new vouchd process: the AK was reloaded)", q.pcrs.iter().map(|p| p.index).collect::<Vec<_>>());
    let verifier = AkVerifier::new(&ak_pub)?;
    let qn = ak_qualified_name(&ek_pub, &ak_pub)?;
    let expect = Expectation {
        nonce: &nonce,
        qualified_signer: Some(&qn),
    };
    let attest = verify_quote(&verifier, &q.attest, &q.signature, &q.pcrs, expect)?;
    println!(
        "[verifier] quote verified: signature by the enrolled AK, nonce, qualified signer, PCR digest ✔ (resetCount {}, runtime PCR {} = {})",
        attest.clock_info.reset_count,
        vouch_proto::DEFAULT_RUNTIME_PCR,
        q.pcrs.last().map(|p| hex::encode(&p.value)).unwrap_or_default()
    );

    let mut forged = q.pcrs.clone();
    if let Some(p) = forged.last_mut() {
        p.value[0] ^= 0xff;
    }
    match verify_quote(&verifier, &q.attest, &q.signature, &forged, expect) {
        Err(e @ QuoteError::PcrDigestMismatch { .. }) => {
            println!("[verifier] a forged runtime PCR value is refused: {e} ✔")
        }
        other => bail!("forged PCR value was not refused: {other:?}"),
    }
    let other_nonce = random::<32>()?;
    match verify_quote(
        &verifier,
        &q.attest,
        &q.signature,
        &q.pcrs,
        Expectation {
            nonce: &other_nonce,
            qualified_signer: Some(&qn),
        },
    ) {
        Err(e @ QuoteError::NonceMismatch) => {
            println!("[verifier] a replayed quote (other nonce) is refused: {e} ✔")
        }
        other => bail!("replayed quote was not refused: {other:?}"),
    }
    drop(sw);
    println!("\nDemo finished; swtpm stopped and its state removed.");
    Ok(())
}
