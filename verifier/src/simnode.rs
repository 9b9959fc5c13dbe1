//! Simulated nodes for load generation and tests: software P-256 keys that
//! produce genuine TPMS_ATTEST quotes and TPMT_SIGNATUREs, and a runtime log
//! extended exactly as vouchd does. The verifier cannot tell these quotes
//! from a TPM's — which is the point for benchmarks, and why enrollment
//! (EK certificate + credential activation) is what keeps such keys out of
//! production.

use std::collections::BTreeMap;

use ring::rand::{SecureRandom, SystemRandom};
use vouch_proto::event::{Event, EventKind, Record};
use vouch_proto::measurement::{self as m, InstanceId, Measurement, StartFacts};
use vouch_proto::name::ak_qualified_name;
use vouch_proto::p256::SimSigner;
use vouch_proto::quote::{AkVerifier, PcrValue};
use vouch_proto::tpm::{
    alg, attr, curve, Attest, ClockInfo, HashAlg, PcrSelection, PcrSelectionList, Public,
    PublicKey, QuoteInfo, Scheme, Signature, TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE,
};

use crate::appraise::NodeState;

/// A quote as (TPMS_ATTEST, TPMT_SIGNATURE, PCR values).
pub type SoftQuote = (Vec<u8>, Vec<u8>, Vec<PcrValue>);

/// A simulated node.
pub struct SimNode {
    key: SimSigner,
    rng: SystemRandom,
    /// AK public area.
    pub ak: Public,
    /// EK public area (a software key; only its Name matters here).
    pub ek: Public,
    /// Boot counters.
    pub boot: (u32, u32),
    /// Runtime PCR index.
    pub runtime_pcr: u8,
    /// Runtime PCR value.
    pub pcr: [u8; 32],
    /// The encoded events of this boot from sequence number `log_base` on
    /// (all of them unless [`SimNode::forget_before`] was called).
    pub log: Vec<Vec<u8>>,
    /// Sequence number of `log[0]`.
    pub log_base: u64,
    /// The AK's qualified name (fixed for the node's life).
    qualified_name: Vec<u8>,
    /// Boot PCR values (0-7).
    pub boot_pcrs: [[u8; 32]; 8],
}

fn ecc_public(
    point: &[u8],
    attrs: u32,
    scheme: Scheme,
    sym: Option<vouch_proto::tpm::SymDef>,
) -> Public {
    Public {
        name_alg: alg::SHA256,
        object_attributes: attrs,
        auth_policy: Vec::new(),
        symmetric: sym,
        key: PublicKey::Ecc {
            scheme,
            curve: curve::NIST_P256,
            kdf: Scheme::NULL,
            x: point[1..33].to_vec(),
            y: point[33..65].to_vec(),
        },
    }
}

impl SimNode {
    /// A node with fresh keys, booted (log started with BootStart).
    pub fn new(seed: u64) -> Result<Self, String> {
        let rng = SystemRandom::new();
        // A software key: a random scalar and its point.
        let soft_key = || loop {
            let mut secret = [0u8; 32];
            rng.fill(&mut secret).map_err(|_| "rng".to_string())?;
            if let Some(k) = SimSigner::new(&secret) {
                return Ok::<_, String>(k);
            }
        };
        let (key, ak_point) = soft_key()?;
        // The EK only needs a public point (its Name is what counts here).
        let (_, ek_point) = soft_key()?;
        let ak = ecc_public(
            &ak_point,
            attr::FIXED_TPM
                | attr::FIXED_PARENT
                | attr::SENSITIVE_DATA_ORIGIN
                | attr::USER_WITH_AUTH
                | attr::RESTRICTED
                | attr::SIGN_ENCRYPT,
            Scheme::with_hash(alg::ECDSA, HashAlg::Sha256),
            None,
        );
        let ek = ecc_public(
            &ek_point,
            attr::FIXED_TPM
                | attr::FIXED_PARENT
                | attr::SENSITIVE_DATA_ORIGIN
                | attr::RESTRICTED
                | attr::DECRYPT,
            Scheme::NULL,
            Some(vouch_proto::tpm::SymDef {
                alg: alg::AES,
                key_bits: 128,
                mode: alg::CFB,
            }),
        );
        let mut boot_pcrs = [[0u8; 32]; 8];
        for (i, p) in boot_pcrs.iter_mut().enumerate() {
            *p = vouch_proto::event::digest(&[i as u8, (seed & 0xff) as u8]);
        }
        let qualified_name = ak_qualified_name(&ek, &ak).map_err(|e| e.to_string())?;
        let mut me = Self {
            key,
            rng,
            ak,
            ek,
            log_base: 0,
            qualified_name,
            boot: (1, 0),
            runtime_pcr: vouch_proto::DEFAULT_RUNTIME_PCR,
            pcr: [0; 32],
            log: Vec::new(),
            boot_pcrs,
        };
        let facts = StartFacts {
            pcr_found: [0; 32],
            reset_count: 1,
            restart_count: 0,
            vouchd_sha256: [7; 32],
            runtime_pcr: me.runtime_pcr,
            integrity_lost: false,
            reason: None,
        };
        me.append(EventKind::BootStart, facts.body(EventKind::BootStart));
        Ok(me)
    }

    /// Appends an event to the simulated log and extends the PCR.
    pub fn append(&mut self, kind: EventKind, body: Record) {
        let seq = self.log_base + self.log.len() as u64;
        let e = Event {
            kind,
            seq,
            time_unix_ns: 1_700_000_000_000_000_000 + seq,
            body,
        };
        let raw = e.encode();
        self.pcr = vouch_proto::event::extend(&self.pcr, &vouch_proto::event::digest(&raw));
        self.log.push(raw);
    }

    /// The events from sequence number `seq` on (empty if `seq` is past the
    /// end or before what was forgotten).
    pub fn events_from(&self, seq: u64) -> &[Vec<u8>] {
        let i = seq.saturating_sub(self.log_base) as usize;
        self.log.get(i..).unwrap_or(&[])
    }

    /// Drops the events before `seq` (the verifier accepted them), as
    /// vouchd's log rotation would; keeps a long simulation's memory flat.
    pub fn forget_before(&mut self, seq: u64) {
        let n = (seq.saturating_sub(self.log_base) as usize).min(self.log.len());
        self.log.drain(..n);
        self.log_base += n as u64;
    }

    /// Appends an InstanceMeasured event for `meas`.
    pub fn measure(&mut self, meas: &Measurement) {
        self.append(EventKind::InstanceMeasured, m::measured_body(meas));
    }

    /// The PCR values a quote covers (0-7, runtime), in quote order.
    pub fn pcr_values(&self) -> Vec<PcrValue> {
        let mut v: Vec<PcrValue> = (0u8..8)
            .map(|i| PcrValue {
                bank: alg::SHA256,
                index: i,
                value: self.boot_pcrs[usize::from(i)].to_vec(),
            })
            .collect();
        v.push(PcrValue {
            bank: alg::SHA256,
            index: self.runtime_pcr,
            value: self.pcr.to_vec(),
        });
        v
    }

    /// Prepares `count` more signature nonces ahead of time (a load
    /// generator does this before measuring, so its quotes cost little).
    pub fn presign(&mut self, count: usize) -> Result<(), String> {
        let target = self.key.presigned() + count;
        while self.key.presigned() < target {
            let mut k = [0u8; 32];
            self.rng.fill(&mut k).map_err(|_| "rng".to_string())?;
            self.key.presign(&k);
        }
        Ok(())
    }

    /// A genuine quote over the current PCRs with `nonce`:
    /// (TPMS_ATTEST, TPMT_SIGNATURE, PCR values).
    pub fn quote(&mut self, nonce: &[u8]) -> Result<SoftQuote, String> {
        let pcrs = self.pcr_values();
        let mut sel: Vec<u8> = (0..8).collect();
        sel.push(self.runtime_pcr);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for p in &pcrs {
            ctx.update(&p.value);
        }
        let attest = Attest {
            magic: TPM_GENERATED_VALUE,
            attest_type: TPM_ST_ATTEST_QUOTE,
            qualified_signer: self.qualified_name.clone(),
            extra_data: nonce.to_vec(),
            clock_info: ClockInfo {
                clock: 1000,
                reset_count: self.boot.0,
                restart_count: self.boot.1,
                safe: true,
            },
            firmware_version: 1,
            quote: QuoteInfo {
                pcr_select: PcrSelectionList(vec![PcrSelection::new(HashAlg::Sha256, &sel)]),
                pcr_digest: ctx.finish().as_ref().to_vec(),
            },
        }
        .marshal();
        if self.key.presigned() == 0 {
            self.presign(1)?;
        }
        let (r, sig_s) = self.key.sign(&attest).ok_or("sign")?;
        let signature = Signature::Ecdsa {
            hash: alg::SHA256,
            r: r.to_vec(),
            s: sig_s.to_vec(),
        }
        .marshal();
        Ok((attest, signature, pcrs))
    }

    /// The verifier's state for this node right after enrollment.
    pub fn enrolled_state(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<NodeState, String> {
        Ok(NodeState {
            name: name.to_owned(),
            labels,
            ak: AkVerifier::new(&self.ak).map_err(|e| e.to_string())?,
            qualified_name: ak_qualified_name(&self.ek, &self.ak).map_err(|e| e.to_string())?,
            boot: None,
            runtime_pcr: self.runtime_pcr,
            next_seq: 0,
            pcr: [0; 32],
            integrity_lost: None,
            instances: BTreeMap::new(),
            anomalies: Vec::new(),
        })
    }
}

/// A plausible measurement of a daprd instance (for simulations).
pub fn sample_measurement(pid: u32, app_id: &str, exe_sha256: &str, netns: u64) -> Measurement {
    Measurement {
        id: InstanceId {
            pid,
            start_time: 1000 + u64::from(pid),
            exe_dev: 64768,
            exe_ino: 4242,
        },
        comm: "daprd".into(),
        exe: m::ExeMeasurement {
            path: "/usr/local/bin/daprd".into(),
            sha256: Some(exe_sha256.to_owned()),
            size: 80 << 20,
            deleted: false,
            replaced: false,
        },
        argv: vec!["daprd".into(), "--app-id".into(), app_id.into()],
        flags: m::DaprFlags {
            app_id: Some(app_id.into()),
            listen_addresses: vec!["127.0.0.1".into()],
            ..Default::default()
        },
        env: m::EnvMeasurement {
            namespace: Some("prod".into()),
            dapr_api_token_sha256: Some("ab".repeat(32)),
            ..Default::default()
        },
        files: Vec::new(),
        config_mtls_enabled: Some(true),
        uid: 1000,
        gid: 1000,
        netns,
        cgroup: "/".into(),
        container: None,
        listeners: Vec::new(),
        errors: Vec::new(),
    }
}
