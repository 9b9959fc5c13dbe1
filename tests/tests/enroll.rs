//! Enrollment against real swtpm EKs: EK certificates chain (or not) to the
//! configured CA bundle and certify exactly the presented EK; the AK is
//! bound to the EK by MakeCredential -> TPM2_ActivateCredential.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use vouch_daemon::tpm::{AkAlg, EkChoice, Tpm};
use vouch_tests::require_tools;
use vouch_tests::swtpm::Swtpm;
use vouch_verifier::enroll::{
    challenge, complete, ek_id, validate_ek, EkTrust, EnrollError, TrustBasis,
};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn trust_of(sw: &Swtpm) -> EkTrust {
    let mut t = EkTrust::default();
    t.add_pem_bundle(&sw.ca_root()).unwrap();
    t.add_pem_bundle(&sw.ca_issuer()).unwrap();
    t
}

#[test]
fn ek_certificates_chain_to_the_configured_ca_only() {
    if !require_tools(&["swtpm", "swtpm_setup"]) {
        return;
    }
    let a = Swtpm::start().unwrap();
    let b = Swtpm::start().unwrap();
    let mut tpm = Tpm::open(&a.tcti()).unwrap();
    let rsa = tpm.load_ek(EkChoice::Rsa2048).unwrap();
    let ecc = tpm.load_ek(EkChoice::EccP384).unwrap();
    for ek in [&rsa, &ecc] {
        let basis =
            validate_ek(&trust_of(&a), &ek.public, &ek.certificate, &ek.chain, now()).unwrap();
        assert!(matches!(basis, TrustBasis::Certificate(_)), "{basis:?}");
        // Another manufacturer's CA: refused.
        let e =
            validate_ek(&trust_of(&b), &ek.public, &ek.certificate, &ek.chain, now()).unwrap_err();
        assert!(matches!(e, EnrollError::Untrusted(_)), "{e:?}");
        // Not yet valid / expired.
        let e = validate_ek(&trust_of(&a), &ek.public, &ek.certificate, &ek.chain, 0).unwrap_err();
        assert!(matches!(e, EnrollError::Expired { .. }), "{e:?}");
    }
    // A valid certificate presented with another EK public area.
    let e = validate_ek(&trust_of(&a), &ecc.public, &rsa.certificate, &[], now()).unwrap_err();
    assert_eq!(e, EnrollError::EkKeyMismatch);
    // Allowlist and trust on first use, without any CA.
    let mut t = EkTrust::default();
    assert!(validate_ek(&t, &rsa.public, &rsa.certificate, &[], now()).is_err());
    t.allowlist.insert(ek_id(&rsa.public));
    assert_eq!(
        validate_ek(&t, &rsa.public, &rsa.certificate, &[], now()),
        Ok(TrustBasis::Allowlist)
    );
    let t = EkTrust {
        tofu: true,
        ..Default::default()
    };
    assert_eq!(
        validate_ek(&t, &ecc.public, &ecc.certificate, &[], now()),
        Ok(TrustBasis::FirstUse)
    );
}

#[test]
fn credential_activation_binds_the_ak_to_the_ek() {
    if !require_tools(&["swtpm", "swtpm_setup"]) {
        return;
    }
    let sw = Swtpm::start().unwrap();
    for choice in [EkChoice::Rsa2048, EkChoice::EccP384] {
        // A fresh context per EK: dropping it flushes the loaded EK and AK
        // (libtpms has 3 object slots).
        let mut tpm = Tpm::open(&sw.tcti()).unwrap();
        let ek = tpm.load_ek(choice).unwrap();
        let ak = tpm
            .load_or_create_ak(
                &ek,
                &sw.scratch().join(format!("ak-{choice:?}")),
                AkAlg::EccP256,
            )
            .unwrap();
        let c = challenge(&ek.public, &ak.public).unwrap();
        let secret = tpm
            .activate_credential(
                &ak,
                &ek,
                &c.credential.id_object,
                &c.credential.encrypted_secret,
            )
            .unwrap();
        assert_eq!(complete(&c, &secret), Ok(()));
        assert_eq!(complete(&c, &[0u8; 32]), Err(EnrollError::SecretMismatch));
        // An AK the node claims but that is not the one in this TPM: the
        // challenge is for the claimed AK's Name, activation fails.
        let other = vouch_verifier::simnode::SimNode::new(9).unwrap();
        let c2 = challenge(&ek.public, &other.ak.marshal()).unwrap();
        assert!(tpm
            .activate_credential(
                &ak,
                &ek,
                &c2.credential.id_object,
                &c2.credential.encrypted_secret
            )
            .is_err());
        // A decrypt key is no attestation key.
        assert!(matches!(
            challenge(&ek.public, &ek.public),
            Err(EnrollError::BadAk(_))
        ));
    }
}
