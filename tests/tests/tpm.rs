//! TPM layer end-to-end on a private swtpm per test: MakeCredential (pure
//! Rust) -> ActivateCredential (TPM), quotes verified by vouch-proto and by
//! tpm2_checkquote, EK certificates checked with openssl, AK persistence
//! across daemon restarts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::process::Command;

use vouch_daemon::tpm::{AkAlg, EkChoice, Tpm};
use vouch_proto::credential::make_credential;
use vouch_proto::name::{ak_qualified_name, name_of};
use vouch_proto::quote::{verify_quote, AkVerifier, Expectation, PcrValue, QuoteError};
use vouch_proto::tpm::Public;
use vouch_tests::proc::{run_ok, workspace_bin};
use vouch_tests::require_tools;
use vouch_tests::swtpm::Swtpm;

fn swtpm() -> Option<Swtpm> {
    if !require_tools(&["swtpm", "swtpm_setup", "swtpm_localca"]) {
        return None;
    }
    Some(Swtpm::start().expect("start swtpm"))
}

fn pcrs_all() -> Vec<u8> {
    let mut p = vouch_proto::BOOT_PCRS.to_vec();
    p.push(vouch_proto::DEFAULT_RUNTIME_PCR);
    p
}

fn activate_roundtrip(choice: EkChoice) {
    let Some(sw) = swtpm() else { return };
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let ek = tpm.load_ek(choice).unwrap();
    let ak = tpm
        .load_or_create_ak(&ek, &sw.scratch().join("ak"), AkAlg::EccP256)
        .unwrap();
    let ek_pub = Public::parse(&ek.public).unwrap();
    let ak_pub = Public::parse(&ak.public).unwrap();
    // vouch-proto computes the same Name the TPM reports.
    assert_eq!(name_of(&ak.public, ak_pub.name_alg).unwrap(), ak.name);

    let secret = b"vouch enrollment secret 32 bytes";
    let cred = make_credential(&ek_pub, &ak.name, secret).unwrap();
    let got = tpm
        .activate_credential(&ak, &ek, &cred.id_object, &cred.encrypted_secret)
        .unwrap();
    assert_eq!(got, secret);

    // A credential made for another AK's Name must not activate with this AK.
    let other = tpm
        .load_or_create_ak(&ek, &sw.scratch().join("ak2"), AkAlg::EccP256)
        .unwrap();
    assert_ne!(other.name, ak.name);
    let wrong = make_credential(&ek_pub, &other.name, secret).unwrap();
    let err = tpm
        .activate_credential(&ak, &ek, &wrong.id_object, &wrong.encrypted_secret)
        .expect_err("credential for another AK must fail");
    let chain = format!("{:?}", anyhow::Error::from(err));
    assert!(chain.contains("ActivateCredential"), "{chain}");
    // ...while the right AK still activates it.
    let ok = tpm
        .activate_credential(&other, &ek, &wrong.id_object, &wrong.encrypted_secret)
        .unwrap();
    assert_eq!(ok, secret);
}

#[test]
fn make_credential_activates_on_rsa_ek() {
    activate_roundtrip(EkChoice::Rsa2048);
}

#[test]
fn make_credential_activates_on_ecc_p384_ek() {
    activate_roundtrip(EkChoice::EccP384);
}

struct Quoted {
    ek_pub: Public,
    ak_pub: Public,
    ak_public: Vec<u8>,
    nonce: Vec<u8>,
    attest: Vec<u8>,
    signature: Vec<u8>,
    pcrs: Vec<PcrValue>,
}

fn make_quote(sw: &Swtpm, ak_alg: AkAlg, ek: EkChoice) -> Quoted {
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let ek = tpm.load_ek(ek).unwrap();
    let ak = tpm
        .load_or_create_ak(&ek, &sw.scratch().join(format!("ak-{ak_alg:?}")), ak_alg)
        .unwrap();
    // Make the runtime PCR non-trivial.
    tpm.pcr_extend(vouch_proto::DEFAULT_RUNTIME_PCR, &[7u8; 32])
        .unwrap();
    let nonce: Vec<u8> = (0u8..32).collect();
    let q = tpm.quote(&ak, &nonce, &pcrs_all()).unwrap();
    Quoted {
        ek_pub: Public::parse(&ek.public).unwrap(),
        ak_pub: Public::parse(&ak.public).unwrap(),
        ak_public: ak.public.clone(),
        nonce,
        attest: q.attest,
        signature: q.signature,
        pcrs: q.pcrs,
    }
}

fn verify(
    q: &Quoted,
    attest: &[u8],
    sig: &[u8],
    nonce: &[u8],
    pcrs: &[PcrValue],
) -> Result<(), QuoteError> {
    let v = AkVerifier::new(&q.ak_pub)?;
    let qn = ak_qualified_name(&q.ek_pub, &q.ak_pub).unwrap();
    verify_quote(
        &v,
        attest,
        sig,
        pcrs,
        Expectation {
            nonce,
            qualified_signer: Some(&qn),
        },
    )
    .map(|_| ())
}

fn quote_tamper(ak_alg: AkAlg, ek: EkChoice) {
    let Some(sw) = swtpm() else { return };
    let q = make_quote(&sw, ak_alg, ek);
    assert_eq!(q.pcrs.len(), 9);
    assert_eq!(q.pcrs[8].index, vouch_proto::DEFAULT_RUNTIME_PCR);
    verify(&q, &q.attest, &q.signature, &q.nonce, &q.pcrs).unwrap();

    // Every byte of the attest structure.
    for i in 0..q.attest.len() {
        let mut a = q.attest.clone();
        a[i] ^= 0x01;
        let e = verify(&q, &a, &q.signature, &q.nonce, &q.pcrs).unwrap_err();
        assert!(
            matches!(
                e,
                QuoteError::SignatureInvalid
                    | QuoteError::AttestMalformed(_)
                    | QuoteError::BadMagic(_)
                    | QuoteError::NotAQuote(_)
            ),
            "attest byte {i}: {e:?}"
        );
    }
    // Every byte of the signature.
    for i in 0..q.signature.len() {
        let mut s = q.signature.clone();
        s[i] ^= 0x01;
        let e = verify(&q, &q.attest, &s, &q.nonce, &q.pcrs).unwrap_err();
        assert!(
            matches!(
                e,
                QuoteError::SignatureInvalid
                    | QuoteError::SignatureMalformed(_)
                    | QuoteError::SchemeMismatch { .. }
            ),
            "signature byte {i}: {e:?}"
        );
    }
    // Every byte of the nonce.
    for i in 0..q.nonce.len() {
        let mut n = q.nonce.clone();
        n[i] ^= 0x80;
        assert_eq!(
            verify(&q, &q.attest, &q.signature, &n, &q.pcrs),
            Err(QuoteError::NonceMismatch)
        );
    }
    // Every reported PCR value.
    for p in 0..q.pcrs.len() {
        let mut pcrs = q.pcrs.clone();
        pcrs[p].value[31] ^= 0x01;
        let e = verify(&q, &q.attest, &q.signature, &q.nonce, &pcrs).unwrap_err();
        assert!(
            matches!(e, QuoteError::PcrDigestMismatch { .. }),
            "pcr {p}: {e:?}"
        );
    }
    // A dropped PCR is a selection mismatch, not a digest mismatch.
    let e = verify(&q, &q.attest, &q.signature, &q.nonce, &q.pcrs[..8]).unwrap_err();
    assert!(
        matches!(e, QuoteError::PcrSelectionMismatch { .. }),
        "{e:?}"
    );
    // A quote by this AK under another EK's qualified name is refused.
    let v = AkVerifier::new(&q.ak_pub).unwrap();
    let e = verify_quote(
        &v,
        &q.attest,
        &q.signature,
        &q.pcrs,
        Expectation {
            nonce: &q.nonce,
            qualified_signer: Some(&[0u8; 34]),
        },
    )
    .unwrap_err();
    assert_eq!(e, QuoteError::QualifiedSignerMismatch);
    let _ = &q.ak_public;
}

#[test]
fn quote_ecc_ak_verifies_and_every_tamper_fails() {
    quote_tamper(AkAlg::EccP256, EkChoice::Rsa2048);
}

#[test]
fn quote_rsa_ak_verifies_and_every_tamper_fails() {
    quote_tamper(AkAlg::Rsa2048, EkChoice::EccP384);
}

/// tpm2-tools' "serialized" PCR file: TPML_PCR_SELECTION (4 + 16*8 bytes,
/// little-endian, as the C struct), a u32 count, then TPML_DIGESTs of at most
/// 8 entries (4 + 8*66 bytes each).
fn tpm2_tools_pcr_file(q: &Quoted) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&1u32.to_le_bytes());
    let mut sel = [0u8; 8];
    sel[..2].copy_from_slice(&0x000bu16.to_le_bytes());
    sel[2] = 3;
    for p in &q.pcrs {
        sel[3 + usize::from(p.index / 8)] |= 1 << (p.index % 8);
    }
    out.extend_from_slice(&sel);
    out.extend_from_slice(&[0u8; 15 * 8]);
    let lists: Vec<&[PcrValue]> = q.pcrs.chunks(8).collect();
    out.extend_from_slice(&(lists.len() as u32).to_le_bytes());
    for l in lists {
        out.extend_from_slice(&(l.len() as u32).to_le_bytes());
        for i in 0..8 {
            let mut d = [0u8; 66];
            if let Some(p) = l.get(i) {
                d[..2].copy_from_slice(&(p.value.len() as u16).to_le_bytes());
                d[2..2 + p.value.len()].copy_from_slice(&p.value);
            }
            out.extend_from_slice(&d);
        }
    }
    out
}

fn checkquote(ak_alg: AkAlg) {
    if !require_tools(&["tpm2_checkquote"]) {
        return;
    }
    let Some(sw) = swtpm() else { return };
    let q = make_quote(&sw, ak_alg, EkChoice::Rsa2048);
    let d = sw.scratch();
    // TPM2B_PUBLIC ("tss" format) of the AK.
    let mut tss = (q.ak_public.len() as u16).to_be_bytes().to_vec();
    tss.extend_from_slice(&q.ak_public);
    std::fs::write(d.join("ak.tss"), &tss).unwrap();
    std::fs::write(d.join("attest"), &q.attest).unwrap();
    std::fs::write(d.join("sig"), &q.signature).unwrap();
    std::fs::write(d.join("pcrs"), tpm2_tools_pcr_file(&q)).unwrap();
    let run = |nonce: &[u8], sig: &str| {
        Command::new("tpm2_checkquote")
            .arg("-u")
            .arg(d.join("ak.tss"))
            .arg("-m")
            .arg(d.join("attest"))
            .arg("-s")
            .arg(d.join(sig))
            .arg("-f")
            .arg(d.join("pcrs"))
            .args(["-g", "sha256", "-q"])
            .arg(hex::encode(nonce))
            .output()
            .unwrap()
    };
    let out = run(&q.nonce, "sig");
    assert!(
        out.status.success(),
        "tpm2_checkquote rejected our quote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And it rejects a wrong nonce, so the check above could fail.
    let mut bad = q.nonce.clone();
    bad[0] ^= 1;
    assert!(!run(&bad, "sig").status.success());
}

#[test]
fn quote_verifies_with_tpm2_checkquote_ecc() {
    checkquote(AkAlg::EccP256);
}

#[test]
fn quote_verifies_with_tpm2_checkquote_rsa() {
    checkquote(AkAlg::Rsa2048);
}

fn openssl(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write;
    let mut c = Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(i) = stdin {
        c.stdin.take().unwrap().write_all(i).unwrap();
    }
    drop(c.stdin.take());
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn ek_cert_chains(choice: EkChoice) {
    if !require_tools(&["openssl"]) {
        return;
    }
    let Some(sw) = swtpm() else { return };
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let ek = tpm.load_ek(choice).unwrap();
    let d = sw.scratch();
    let pem = openssl(
        &["x509", "-inform", "DER", "-outform", "PEM"],
        Some(&ek.certificate),
    );
    std::fs::write(d.join("ek.pem"), &pem).unwrap();
    let root = sw.ca_root();
    let issuer = sw.ca_issuer();
    let ok = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg("-untrusted")
        .arg(&issuer)
        .arg(d.join("ek.pem"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    // Without the issuer the path cannot be built: the check can fail.
    let bad = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg(d.join("ek.pem"))
        .output()
        .unwrap();
    assert!(!bad.status.success());

    // The certified key is the EK's public key.
    let spki = openssl(
        &["x509", "-inform", "DER", "-noout", "-pubkey"],
        Some(&ek.certificate),
    );
    let der = openssl(&["pkey", "-pubin", "-outform", "DER"], Some(&spki));
    match Public::parse(&ek.public).unwrap().key {
        vouch_proto::tpm::PublicKey::Ecc { x, y, .. } => {
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            assert!(der.ends_with(&point), "EK point differs from certificate");
        }
        vouch_proto::tpm::PublicKey::Rsa { modulus, .. } => {
            let m = openssl(
                &["x509", "-inform", "DER", "-noout", "-modulus"],
                Some(&ek.certificate),
            );
            let m = String::from_utf8(m).unwrap();
            assert_eq!(
                m.trim().trim_start_matches("Modulus="),
                hex::encode_upper(&modulus)
            );
        }
    }
}

#[test]
fn ek_certificate_rsa_chains_to_local_ca() {
    ek_cert_chains(EkChoice::Rsa2048);
}

#[test]
fn ek_certificate_ecc_chains_to_local_ca() {
    ek_cert_chains(EkChoice::EccP384);
}

#[derive(serde::Deserialize)]
struct Info {
    ak: InfoAk,
    ek: InfoEk,
}
#[derive(serde::Deserialize)]
struct InfoAk {
    public: String,
    name: String,
    created: bool,
}
#[derive(serde::Deserialize)]
struct InfoEk {
    public: String,
}
type QuoteOut = vouch_proto::quote::QuoteJson;

#[test]
fn ak_survives_daemon_restart_and_tpm_reboot() {
    let Some(mut sw) = swtpm() else { return };
    let vouchd = workspace_bin("vouchd").unwrap();
    let state = sw.scratch().join("vouchd-state");
    let run = |sw: &Swtpm, args: &[&str]| {
        let out = run_ok(
            Command::new(&vouchd)
                .args(args)
                .env("VOUCHD_TCTI", sw.tcti())
                .env("VOUCHD_STATE_DIR", &state)
                .env("TSS2_LOG", "all+none"),
        )
        .unwrap();
        out.stdout
    };
    let first: Info = serde_json::from_slice(&run(&sw, &["tpm", "info"])).unwrap();
    assert!(first.ak.created);
    for f in ["ak.pub", "ak.priv", "ak.meta"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let ak_pub = Public::parse(&hex::decode(&first.ak.public).unwrap()).unwrap();
    let ek_pub = Public::parse(&hex::decode(&first.ek.public).unwrap()).unwrap();
    let verifier = AkVerifier::new(&ak_pub).unwrap();
    let qn = ak_qualified_name(&ek_pub, &ak_pub).unwrap();

    let check = |sw: &Swtpm, nonce: &str| {
        let q: QuoteOut =
            serde_json::from_slice(&run(sw, &["tpm", "quote", "--nonce", nonce])).unwrap();
        let nonce = hex::decode(nonce).unwrap();
        verify_quote(
            &verifier,
            &q.attest,
            &q.signature,
            &q.pcrs,
            Expectation {
                nonce: &nonce,
                qualified_signer: Some(&qn),
            },
        )
        .unwrap()
    };
    // A new vouchd process (a restart) loads the same AK and its quotes
    // verify with the public key recorded at first start.
    let before = check(&sw, &"ab".repeat(32));
    let again: Info = serde_json::from_slice(&run(&sw, &["tpm", "info"])).unwrap();
    assert!(!again.ak.created);
    assert_eq!(again.ak.name, first.ak.name);
    // A TPM reboot too: same AK, resetCount moved on.
    sw.reboot().unwrap();
    let after = check(&sw, &"cd".repeat(32));
    assert!(after.clock_info.reset_count > before.clock_info.reset_count);
    let third: Info = serde_json::from_slice(&run(&sw, &["tpm", "info"])).unwrap();
    assert_eq!(third.ak.name, first.ak.name);
}

/// Regenerates test-data/quotes/*.json: genuine swtpm quotes that
/// vouch-proto's fixture tests and benchmarks verify without a TPM.
#[test]
#[ignore = "writes test-data fixtures; run with --ignored to regenerate"]
fn regenerate_quote_fixtures() {
    let Some(sw) = swtpm() else { return };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../test-data/quotes");
    std::fs::create_dir_all(&dir).unwrap();
    for (file, alg, ek) in [
        ("ecc-p256-ak.json", AkAlg::EccP256, EkChoice::Rsa2048),
        ("rsa-2048-ak.json", AkAlg::Rsa2048, EkChoice::EccP384),
    ] {
        let q = make_quote(&sw, alg, ek);
        verify(&q, &q.attest, &q.signature, &q.nonce, &q.pcrs).unwrap();
        let json = serde_json::json!({
            "comment": "A genuine TPM2_Quote by swtpm (tests/tests/tpm.rs regenerate_quote_fixtures)",
            "ek_public": hex::encode(q.ek_pub.marshal()),
            "ak_public": hex::encode(&q.ak_public),
            "nonce": hex::encode(&q.nonce),
            "attest": hex::encode(&q.attest),
            "signature": hex::encode(&q.signature),
            "pcrs": q.pcrs,
        });
        std::fs::write(
            dir.join(file),
            serde_json::to_string_pretty(&json).unwrap() + "\n",
        )
        .unwrap();
    }
}

/// Software replay (vouch-proto) of event digests equals what the TPM's
/// PCR_Extend computes in the runtime PCR.
#[test]
fn event_replay_matches_tpm_pcr() {
    use vouch_proto::event::{replay, Event, EventKind, Record, Value};
    let Some(sw) = swtpm() else { return };
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let pcr = vouch_proto::DEFAULT_RUNTIME_PCR;
    let start: [u8; 32] = tpm.pcr_read(&[pcr]).unwrap()[0]
        .value
        .clone()
        .try_into()
        .unwrap();
    let mut digests = Vec::new();
    for seq in 0..5u64 {
        let e = Event {
            kind: EventKind::InstanceMeasured,
            seq,
            time_unix_ns: seq * 1000,
            body: Record::new().with(1, Value::U64(seq)),
        };
        let d = e.digest();
        tpm.pcr_extend(pcr, &d).unwrap();
        digests.push(d);
    }
    let now = tpm.pcr_read(&[pcr]).unwrap()[0].value.clone();
    assert_eq!(now, replay(start, &digests).to_vec());
    assert_ne!(now, replay(start, &digests[..4]).to_vec());
}
