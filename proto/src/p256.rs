//! ECDSA P-256 signature verification, variable time, with a table per key.
//!
//! Owns: P-256 field and scalar arithmetic, Jacobian point arithmetic and
//! ECDSA-SHA256 verification for quotes signed by enrolled AKs; and
//! [`SimSigner`], presigned signing for simulated nodes only.
//!
//! Trust boundary: every input to verification is public (the AK's public
//! key, the signed bytes and the signature), so the code branches and
//! indexes on data (variable time). It must never handle a secret: the
//! only signer, [`SimSigner`], is for software keys that guard nothing.
//! Untrusted bytes are checked before any arithmetic: the key's coordinates
//! must be below p and the point on the curve ([`P256Key::new`]); r and s
//! must lie in [1, n-1] ([`P256Key::verify`]). Tests compare every answer
//! with ring and with the Wycheproof vectors.
//!
//! Why not ring's verify: ring multiplies the signer's point with a
//! constant-time window ladder (256 doublings) for every signature and
//! inverts s by a constant-time exponentiation. A quote verifier checks
//! many signatures by the same few keys, so here each key gets a comb table
//! once ([`TEETH`] teeth, 2^TEETH - 1 affine points, 4 KB):
//! u2·Q then costs [`SPACING`] doublings and as many mixed additions;
//! u1·G uses a static table of 37 windows of 64 multiples (no doublings),
//! and s is inverted by a binary extended Euclid. Together this takes about
//! 60% of ring's time per signature on x86-64. Field additions and
//! reductions are branch-free (a coin-toss branch costs more than a select).
//!
//! Representation: field elements are four little-endian 64-bit limbs in
//! Montgomery form (a·2^256 mod p), always fully reduced, so equality is
//! limb equality. Jacobian points (X, Y, Z) stand for (X/Z², Y/Z³); Z = 0 is
//! the point at infinity.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

type Limbs = [u64; 4];

/// The field prime p = 2^256 - 2^224 + 2^192 + 2^96 - 1.
const P: Limbs = [
    0xffff_ffff_ffff_ffff,
    0x0000_0000_ffff_ffff,
    0x0000_0000_0000_0000,
    0xffff_ffff_0000_0001,
];
/// -p^-1 mod 2^64 (p ≡ -1 mod 2^64, so it is 1).
const P_INV: u64 = 1;
/// 2^512 mod p: multiplying by it enters Montgomery form.
const R2_P: Limbs = [
    0x0000_0000_0000_0003,
    0xffff_fffb_ffff_ffff,
    0xffff_ffff_ffff_fffe,
    0x0000_0004_ffff_fffd,
];
/// The group order n.
const N: Limbs = [
    0xf3b9_cac2_fc63_2551,
    0xbce6_faad_a717_9e84,
    0xffff_ffff_ffff_ffff,
    0xffff_ffff_0000_0000,
];
/// -n^-1 mod 2^64.
const N_INV: u64 = 0xccd1_c8aa_ee00_bc4f;
/// 2^512 mod n.
const R2_N: Limbs = [
    0x8324_4c95_be79_eea2,
    0x4699_799c_49bd_6fa6,
    0x2845_b239_2b6b_ec59,
    0x66e1_2d94_f3d9_5620,
];
/// p - n: when r < p - n, x(R) may also be r + n.
const P_MINUS_N: Limbs = [
    0x0c46_353d_039c_daae,
    0x4319_0553_58e8_617b,
    0x0000_0000_0000_0000,
    0x0000_0000_0000_0000,
];
/// The curve coefficient b (plain, not Montgomery).
const B: Limbs = [
    0x3bce_3c3e_27d2_604b,
    0x651d_06b0_cc53_b0f6,
    0xb3eb_bd55_7698_86bc,
    0x5ac6_35d8_aa3a_93e7,
];
/// The base point G (plain coordinates).
const GX: Limbs = [
    0xf4a1_3945_d898_c296,
    0x7703_7d81_2deb_33a0,
    0xf8bc_e6e5_63a4_40f2,
    0x6b17_d1f2_e12c_4247,
];
const GY: Limbs = [
    0xcbb6_4068_37bf_51f5,
    0x2bce_3357_6b31_5ece,
    0x8ee7_eb4a_7c0f_9e16,
    0x4fe3_42e2_fe1a_7f9b,
];

/// Teeth of the per-key comb: the table holds 2^TEETH - 1 points.
pub const TEETH: usize = 6;
/// Distance between the comb's teeth in bits (TEETH·SPACING ≥ 256).
pub const SPACING: usize = 256_usize.div_ceil(TEETH);
/// Width of the signed windows of the static table for G.
const G_WINDOW: usize = 7;
/// Number of windows of G_WINDOW bits covering a 256-bit scalar plus the
/// carry out of the signed recoding.
const G_WINDOWS: usize = 37;
/// Multiples 1..=G_HALF of each window's base point are stored.
const G_HALF: usize = 1 << (G_WINDOW - 1);
// The comb covers every bit of a scalar; the windows cover every bit plus
// the carry out of the signed recoding.
const _: () = assert!(TEETH * SPACING >= 256);
const _: () = assert!(G_WINDOW * G_WINDOWS > 256);

// ---------------------------------------------------------------- limbs

#[inline(always)]
fn adc(a: u64, b: u64, carry: u64) -> (u64, u64) {
    let t = a as u128 + b as u128 + carry as u128;
    (t as u64, (t >> 64) as u64)
}

#[inline(always)]
fn sbb(a: u64, b: u64, borrow: u64) -> (u64, u64) {
    let (d, b1) = a.overflowing_sub(b);
    let (d, b2) = d.overflowing_sub(borrow);
    (d, (b1 | b2) as u64)
}

/// a + b·c + carry as (low, high).
#[inline(always)]
fn mac(a: u64, b: u64, c: u64, carry: u64) -> (u64, u64) {
    let t = a as u128 + (b as u128) * (c as u128) + carry as u128;
    (t as u64, (t >> 64) as u64)
}

/// a - b over four limbs and the borrow out (0 or 1).
#[inline(always)]
fn sub4(a: &Limbs, b: &Limbs) -> (Limbs, u64) {
    let (r0, c) = sbb(a[0], b[0], 0);
    let (r1, c) = sbb(a[1], b[1], c);
    let (r2, c) = sbb(a[2], b[2], c);
    let (r3, c) = sbb(a[3], b[3], c);
    ([r0, r1, r2, r3], c)
}

/// a + b over four limbs and the carry out (0 or 1).
#[inline(always)]
fn add4(a: &Limbs, b: &Limbs) -> (Limbs, u64) {
    let (r0, c) = adc(a[0], b[0], 0);
    let (r1, c) = adc(a[1], b[1], c);
    let (r2, c) = adc(a[2], b[2], c);
    let (r3, c) = adc(a[3], b[3], c);
    ([r0, r1, r2, r3], c)
}

/// Reduces `a + carry·2^256` (known to be < 2m) below m. Branch-free: in
/// field arithmetic whether a subtraction is needed is a coin toss, and
/// mispredicted branches cost more than the select.
#[inline(always)]
fn reduce_once(a: &Limbs, carry: u64, m: &Limbs) -> Limbs {
    let (d, borrow) = sub4(a, m);
    // Keep a only when the subtraction borrowed past the carry bit.
    let keep = 0u64.wrapping_sub(borrow & !carry & 1);
    select(&keep, a, &d)
}

/// `a` where mask is all ones, `b` where it is zero.
#[inline(always)]
fn select(mask: &u64, a: &Limbs, b: &Limbs) -> Limbs {
    [
        (a[0] & mask) | (b[0] & !mask),
        (a[1] & mask) | (b[1] & !mask),
        (a[2] & mask) | (b[2] & !mask),
        (a[3] & mask) | (b[3] & !mask),
    ]
}

#[inline(always)]
fn add_mod(a: &Limbs, b: &Limbs, m: &Limbs) -> Limbs {
    let (s, c) = add4(a, b);
    reduce_once(&s, c, m)
}

/// a - b mod m, branch-free (see [`reduce_once`]).
#[inline(always)]
fn sub_mod(a: &Limbs, b: &Limbs, m: &Limbs) -> Limbs {
    let (d, borrow) = sub4(a, b);
    let mask = 0u64.wrapping_sub(borrow);
    add4(&d, &[m[0] & mask, m[1] & mask, m[2] & mask, m[3] & mask]).0
}

/// Montgomery product a·b·2^-256 mod m, for a, b < m (m odd, < 2^256).
#[inline(always)]
fn mont_mul(a: &Limbs, b: &Limbs, m: &Limbs, m_inv: u64) -> Limbs {
    let mut t = [0u64; 8];
    for i in 0..4 {
        let mut carry = 0;
        for j in 0..4 {
            let (lo, hi) = mac(t[i + j], a[i], b[j], carry);
            t[i + j] = lo;
            carry = hi;
        }
        t[i + 4] = carry;
    }
    let mut top = 0;
    for i in 0..4 {
        let k = t[i].wrapping_mul(m_inv);
        let mut carry = 0;
        for j in 0..4 {
            let (lo, hi) = mac(t[i + j], k, m[j], carry);
            t[i + j] = lo;
            carry = hi;
        }
        let (s, c) = adc(t[i + 4], carry, top);
        t[i + 4] = s;
        top = c;
    }
    reduce_once(&[t[4], t[5], t[6], t[7]], top, m)
}

/// Montgomery square a²·2^-256 mod p: the cross products once, doubled.
#[inline(always)]
fn mont_sqr_p(a: &Limbs) -> Limbs {
    let mut t = [0u64; 8];
    // Cross products a[i]·a[j], i < j.
    for i in 0..3 {
        let mut carry = 0;
        for j in (i + 1)..4 {
            let (lo, hi) = mac(t[i + j], a[i], a[j], carry);
            t[i + j] = lo;
            carry = hi;
        }
        t[i + 4] = carry;
    }
    // Double them.
    let mut carry = 0;
    for x in t.iter_mut().skip(1) {
        let next = *x >> 63;
        *x = (*x << 1) | carry;
        carry = next;
    }
    // Add the squares a[i]².
    let mut c = 0;
    for i in 0..4 {
        let sq = (a[i] as u128) * (a[i] as u128);
        let (lo, c1) = adc(t[2 * i], sq as u64, c);
        let (hi, c2) = adc(t[2 * i + 1], (sq >> 64) as u64, c1);
        t[2 * i] = lo;
        t[2 * i + 1] = hi;
        c = c2;
    }
    reduce_p(t)
}

/// Montgomery reduction t·2^-256 mod p of a 512-bit t < p·2^256, using
/// p's shape: -p^-1 ≡ 1 (mod 2^64), so each round's multiplier is the
/// limb itself, and k·p0 + k = k·2^64 (limb 0 clears, carrying k), p2 = 0.
#[inline(always)]
fn reduce_p(mut t: [u64; 8]) -> Limbs {
    let mut top = 0;
    for i in 0..4 {
        let k = t[i];
        let (lo, carry) = mac(t[i + 1], k, P[1], k);
        t[i + 1] = lo;
        let (lo, carry) = adc(t[i + 2], carry, 0);
        t[i + 2] = lo;
        let (lo, carry) = mac(t[i + 3], k, P[3], carry);
        t[i + 3] = lo;
        let (s, c) = adc(t[i + 4], carry, top);
        t[i + 4] = s;
        top = c;
    }
    reduce_once(&[t[4], t[5], t[6], t[7]], top, &P)
}

/// Montgomery product a·b·2^-256 mod p.
#[inline(always)]
fn mont_mul_p(a: &Limbs, b: &Limbs) -> Limbs {
    let mut t = [0u64; 8];
    for i in 0..4 {
        let mut carry = 0;
        for j in 0..4 {
            let (lo, hi) = mac(t[i + j], a[i], b[j], carry);
            t[i + j] = lo;
            carry = hi;
        }
        t[i + 4] = carry;
    }
    reduce_p(t)
}

fn is_zero(a: &Limbs) -> bool {
    a.iter().all(|l| *l == 0)
}

fn lt(a: &Limbs, b: &Limbs) -> bool {
    sub4(a, b).1 == 1
}

/// Reads up to 32 big-endian bytes into limbs (`None` if longer).
fn from_be(bytes: &[u8]) -> Option<Limbs> {
    if bytes.len() > 32 {
        return None;
    }
    let mut buf = [0u8; 32];
    buf[32 - bytes.len()..].copy_from_slice(bytes);
    let mut out = [0u64; 4];
    for (i, limb) in out.iter_mut().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[24 - 8 * i..32 - 8 * i]);
        *limb = u64::from_be_bytes(w);
    }
    Some(out)
}

// ---------------------------------------------------------------- field

/// A field element in Montgomery form, fully reduced.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Fe(Limbs);

impl Fe {
    const ZERO: Fe = Fe([0; 4]);
    /// 1 in Montgomery form (2^256 mod p).
    const ONE: Fe = Fe([
        0x0000_0000_0000_0001,
        0xffff_ffff_0000_0000,
        0xffff_ffff_ffff_ffff,
        0x0000_0000_ffff_fffe,
    ]);

    /// Enters Montgomery form; `a` must be < p.
    fn from_plain(a: &Limbs) -> Fe {
        Fe(mont_mul(a, &R2_P, &P, P_INV))
    }

    /// Leaves Montgomery form (multiplies by 2^-256).
    fn to_plain(self) -> Limbs {
        mont_mul(&self.0, &[1, 0, 0, 0], &P, P_INV)
    }

    #[inline(always)]
    fn mul(&self, b: &Fe) -> Fe {
        Fe(mont_mul_p(&self.0, &b.0))
    }

    #[inline(always)]
    fn sqr(&self) -> Fe {
        Fe(mont_sqr_p(&self.0))
    }

    #[inline(always)]
    fn add(&self, b: &Fe) -> Fe {
        Fe(add_mod(&self.0, &b.0, &P))
    }

    #[inline(always)]
    fn sub(&self, b: &Fe) -> Fe {
        Fe(sub_mod(&self.0, &b.0, &P))
    }

    #[inline(always)]
    fn dbl(&self) -> Fe {
        self.add(self)
    }

    fn neg(&self) -> Fe {
        Fe::ZERO.sub(self)
    }

    fn is_zero(&self) -> bool {
        is_zero(&self.0)
    }

    /// a^(p-2) = a^-1 (0 for 0), by Fermat. Used when building tables and
    /// presigning, never per verification (which stays in Jacobian form).
    fn invert(&self) -> Fe {
        let e = sub4(&P, &[2, 0, 0, 0]).0;
        let mut acc = Fe::ONE;
        for i in (0..256).rev() {
            acc = acc.sqr();
            if (e[i / 64] >> (i % 64)) & 1 == 1 {
                acc = acc.mul(self);
            }
        }
        acc
    }
}

// ---------------------------------------------------------------- points

/// An affine point (never the point at infinity). Aligned to a cache line:
/// a table lookup then touches one line, not two.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(align(64))]
struct Affine {
    x: Fe,
    y: Fe,
}

impl Affine {
    fn neg(&self) -> Affine {
        Affine {
            x: self.x,
            y: self.y.neg(),
        }
    }
}

/// A point in Jacobian coordinates; z = 0 is the point at infinity.
#[derive(Clone, Copy, Debug)]
struct Jac {
    x: Fe,
    y: Fe,
    z: Fe,
}

impl Jac {
    const INFINITY: Jac = Jac {
        x: Fe::ONE,
        y: Fe::ONE,
        z: Fe::ZERO,
    };

    fn from_affine(a: &Affine) -> Jac {
        Jac {
            x: a.x,
            y: a.y,
            z: Fe::ONE,
        }
    }

    /// 2·self ("dbl-2001-b", a = -3): 3M + 5S. Infinity stays infinity
    /// (z3 = (y+0)² - y² - 0 = 0); there is no point of order 2.
    #[inline(always)]
    fn double(&self) -> Jac {
        let delta = self.z.sqr();
        let gamma = self.y.sqr();
        let beta = self.x.mul(&gamma);
        let t = self.x.sub(&delta).mul(&self.x.add(&delta));
        let alpha = t.dbl().add(&t);
        let beta4 = beta.dbl().dbl();
        let x3 = alpha.sqr().sub(&beta4.dbl());
        let z3 = self.y.add(&self.z).sqr().sub(&gamma).sub(&delta);
        let gamma2_8 = gamma.sqr().dbl().dbl().dbl();
        let y3 = alpha.mul(&beta4.sub(&x3)).sub(&gamma2_8);
        Jac {
            x: x3,
            y: y3,
            z: z3,
        }
    }

    /// self + a ("madd-2007-bl"): 7M + 4S, with the cases the formula does
    /// not cover (self at infinity, self = a, self = -a) handled by branch.
    #[inline(always)]
    fn add_affine(&self, a: &Affine) -> Jac {
        if self.z.is_zero() {
            return Jac::from_affine(a);
        }
        let z1z1 = self.z.sqr();
        let u2 = a.x.mul(&z1z1);
        let s2 = a.y.mul(&self.z).mul(&z1z1);
        let h = u2.sub(&self.x);
        let r = s2.sub(&self.y).dbl();
        if h.is_zero() {
            return if r.is_zero() {
                Jac::from_affine(a).double()
            } else {
                Jac::INFINITY
            };
        }
        let hh = h.sqr();
        let i = hh.dbl().dbl();
        let j = h.mul(&i);
        let v = self.x.mul(&i);
        let x3 = r.sqr().sub(&j).sub(&v.dbl());
        let y3 = r.mul(&v.sub(&x3)).sub(&self.y.mul(&j).dbl());
        let z3 = self.z.add(&h).sqr().sub(&z1z1).sub(&hh);
        Jac {
            x: x3,
            y: y3,
            z: z3,
        }
    }
}

/// Converts finite points to affine with one inversion (Montgomery's
/// trick). Callers pass no point at infinity.
fn normalize_all(points: &[Jac]) -> Vec<Affine> {
    let mut prefix = Vec::with_capacity(points.len());
    let mut acc = Fe::ONE;
    for p in points {
        prefix.push(acc);
        acc = acc.mul(&p.z);
    }
    let mut inv = acc.invert();
    let mut out = vec![
        Affine {
            x: Fe::ZERO,
            y: Fe::ZERO
        };
        points.len()
    ];
    for (i, p) in points.iter().enumerate().rev() {
        let zinv = inv.mul(&prefix[i]);
        inv = inv.mul(&p.z);
        let zinv2 = zinv.sqr();
        out[i] = Affine {
            x: p.x.mul(&zinv2),
            y: p.y.mul(&zinv2.mul(&zinv)),
        };
    }
    out
}

/// The static table for u1·G: window i holds j·2^(7i)·G for j = 1..=64.
fn g_table() -> &'static [Affine] {
    static TABLE: OnceLock<Vec<Affine>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut jac = Vec::with_capacity(G_WINDOWS * G_HALF);
        let mut base = Affine {
            x: Fe::from_plain(&GX),
            y: Fe::from_plain(&GY),
        };
        for _ in 0..G_WINDOWS {
            let mut e = Jac::from_affine(&base);
            jac.push(e);
            for _ in 1..G_HALF {
                e = e.add_affine(&base);
                jac.push(e);
            }
            // Next base: 2^7·base = 2·(64·base).
            let next = e.double();
            base = normalize_all(&[next])[0];
        }
        normalize_all(&jac)
    })
}

/// Bit `i` of a 256-bit scalar (0 past the top).
#[inline(always)]
fn bit(k: &Limbs, i: usize) -> usize {
    if i >= 256 {
        0
    } else {
        ((k[i / 64] >> (i % 64)) & 1) as usize
    }
}

/// Bits [i, i+w) of a 256-bit scalar, w ≤ 8.
fn bits(k: &Limbs, i: usize, w: usize) -> i32 {
    let mut v = 0;
    for j in (0..w).rev() {
        v = (v << 1) | bit(k, i + j) as i32;
    }
    v
}

/// acc + u·G for u < n, from the static windowed table (signed digits).
fn add_g_multiple(mut acc: Jac, u: &Limbs) -> Jac {
    let g = g_table();
    let mut carry = 0;
    for w in 0..G_WINDOWS {
        let mut d = bits(u, G_WINDOW * w, G_WINDOW) + carry;
        carry = 0;
        if d > G_HALF as i32 {
            d -= 1 << G_WINDOW;
            carry = 1;
        }
        let row = &g[w * G_HALF..(w + 1) * G_HALF];
        if d > 0 {
            acc = acc.add_affine(&row[d as usize - 1]);
        } else if d < 0 {
            acc = acc.add_affine(&row[(-d) as usize - 1].neg());
        }
    }
    acc
}

/// Affine coordinates (plain, not Montgomery) of a finite point.
fn to_affine_plain(p: &Jac) -> Option<(Limbs, Limbs)> {
    if p.z.is_zero() {
        return None;
    }
    let a = normalize_all(&[*p])[0];
    Some((a.x.to_plain(), a.y.to_plain()))
}

// ---------------------------------------------------------------- scalars

/// a·b mod n for a, b < n.
fn mul_mod_n(a: &Limbs, b: &Limbs) -> Limbs {
    let ab = mont_mul(a, b, &N, N_INV);
    mont_mul(&ab, &R2_N, &N, N_INV)
}

/// Swaps a and b where mask is all ones; leaves them where it is zero.
#[inline(always)]
fn cswap(a: &mut Limbs, b: &mut Limbs, mask: u64) {
    for i in 0..4 {
        let t = (a[i] ^ b[i]) & mask;
        a[i] ^= t;
        b[i] ^= t;
    }
}

/// a >> k for 0 < k < 64 (vacated bits 0).
#[inline(always)]
fn shr_small(a: &Limbs, k: u32) -> Limbs {
    [
        (a[0] >> k) | (a[1] << (64 - k)),
        (a[1] >> k) | (a[2] << (64 - k)),
        (a[2] >> k) | (a[3] << (64 - k)),
        a[3] >> k,
    ]
}

/// x·2^-k mod n for x < n, 0 < k < 64: adds the multiple m·n that clears
/// x's low k bits (m = -x·n^-1 mod 2^k), then shifts. The result is < 2n
/// before the final subtraction.
#[inline(always)]
fn div_pow2_mod_n(x: &Limbs, k: u32) -> Limbs {
    let m = x[0].wrapping_mul(N_INV) & ((1u64 << k) - 1);
    let (y0, c) = mac(x[0], m, N[0], 0);
    let (y1, c) = mac(x[1], m, N[1], c);
    let (y2, c) = mac(x[2], m, N[2], c);
    let (y3, y4) = mac(x[3], m, N[3], c);
    debug_assert_eq!(y0 & ((1u64 << k) - 1), 0);
    let lo = [
        (y0 >> k) | (y1 << (64 - k)),
        (y1 >> k) | (y2 << (64 - k)),
        (y2 >> k) | (y3 << (64 - k)),
        (y3 >> k) | (y4 << (64 - k)),
    ];
    reduce_once(&lo, y4 >> k, &N)
}

/// Removes the trailing zero bits of an odd-making value: u >>= tz(u) and
/// x = x·2^-tz(u) mod n, keeping x·a ≡ u. `u` must be nonzero.
#[inline(always)]
fn strip_twos(u: &mut Limbs, x: &mut Limbs) {
    loop {
        let tz = if u[0] != 0 {
            u[0].trailing_zeros()
        } else {
            63 // a whole zero limb: take it 63 bits at a time
        };
        if tz == 0 {
            return;
        }
        *u = shr_small(u, tz);
        *x = div_pow2_mod_n(x, tz);
    }
}

/// a^-1 mod n for 0 < a < n, by a binary extended Euclid (variable time:
/// a is public). Invariants: x1·a ≡ u and x2·a ≡ v (mod n); u and v are
/// odd at the top of the loop and gcd(u, v) = gcd(a, n) = 1, so the loop
/// ends with u = v = 1. The larger of u, v is chosen by masks, not
/// branches: which one is larger is data-dependent and unpredictable.
fn inv_mod_n(a: &Limbs) -> Limbs {
    if is_zero(a) {
        return [0; 4];
    }
    let mut u = *a;
    let mut v = N;
    let mut x1: Limbs = [1, 0, 0, 0];
    let mut x2: Limbs = [0; 4];
    strip_twos(&mut u, &mut x1);
    loop {
        let (d, borrow) = sub4(&u, &v);
        if is_zero(&d) {
            return x1;
        }
        let mask = 0u64.wrapping_sub(borrow);
        cswap(&mut u, &mut v, mask);
        cswap(&mut x1, &mut x2, mask);
        u = sub4(&u, &v).0;
        x1 = sub_mod(&x1, &x2, &N);
        strip_twos(&mut u, &mut x1);
    }
}

// ---------------------------------------------------------------- keys

/// Why a P-256 public key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum P256KeyError {
    /// A coordinate is longer than 32 bytes.
    #[error("P-256 coordinate longer than 32 bytes")]
    CoordinateTooLong,
    /// A coordinate is not below the field prime.
    #[error("P-256 coordinate not below the field prime")]
    CoordinateOutOfRange,
    /// (x, y) does not satisfy y² = x³ - 3x + b.
    #[error("P-256 point is not on the curve")]
    NotOnCurve,
}

/// A validated P-256 public key with its comb table, prepared once and used
/// for any number of verifications.
#[derive(Clone, PartialEq, Eq)]
pub struct P256Key {
    /// table[b - 1] = Σ_{j: bit j of b} 2^(SPACING·j)·Q for b in 1..2^TEETH.
    table: Box<[Affine]>,
}

impl std::fmt::Debug for P256Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P256Key")
            .field("table_points", &self.table.len())
            .finish()
    }
}

impl P256Key {
    /// Validates the affine point (x, y) (big-endian, at most 32 bytes
    /// each) and builds its comb table.
    pub fn new(x: &[u8], y: &[u8]) -> Result<Self, P256KeyError> {
        let x = from_be(x).ok_or(P256KeyError::CoordinateTooLong)?;
        let y = from_be(y).ok_or(P256KeyError::CoordinateTooLong)?;
        if !lt(&x, &P) || !lt(&y, &P) {
            return Err(P256KeyError::CoordinateOutOfRange);
        }
        let q = Affine {
            x: Fe::from_plain(&x),
            y: Fe::from_plain(&y),
        };
        // y² = x³ - 3x + b (the point at infinity has no affine form, and
        // the group has prime order: every point on the curve is usable).
        let rhs =
            q.x.sqr()
                .mul(&q.x)
                .sub(&q.x.dbl().add(&q.x))
                .add(&Fe::from_plain(&B));
        if q.y.sqr() != rhs {
            return Err(P256KeyError::NotOnCurve);
        }
        // The teeth 2^(SPACING·j)·Q.
        let mut teeth = Vec::with_capacity(TEETH);
        let mut t = Jac::from_affine(&q);
        teeth.push(t);
        for _ in 1..TEETH {
            for _ in 0..SPACING {
                t = t.double();
            }
            teeth.push(t);
        }
        let teeth = normalize_all(&teeth);
        // Every combination; none is infinity because each is c·Q with
        // 0 < c < 2^(SPACING·(TEETH-1)+1) < n.
        let mut jac: Vec<Jac> = Vec::with_capacity((1 << TEETH) - 1);
        for b in 1usize..(1 << TEETH) {
            let top = usize::BITS as usize - 1 - b.leading_zeros() as usize;
            let rest = b & !(1 << top);
            let p = if rest == 0 {
                Jac::from_affine(&teeth[top])
            } else {
                jac[rest - 1].add_affine(&teeth[top])
            };
            jac.push(p);
        }
        Ok(P256Key {
            table: normalize_all(&jac).into_boxed_slice(),
        })
    }

    /// Verifies an ECDSA-SHA256 signature (r, s big-endian, at most 32
    /// bytes each) over `msg`.
    pub fn verify(&self, msg: &[u8], r: &[u8], s: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(msg).into();
        self.verify_digest(&digest, r, s)
    }

    /// Verifies an ECDSA signature over a 32-byte digest.
    pub fn verify_digest(&self, digest: &[u8; 32], r: &[u8], s: &[u8]) -> bool {
        let (Some(r), Some(s)) = (from_be(r), from_be(s)) else {
            return false;
        };
        if is_zero(&r) || is_zero(&s) || !lt(&r, &N) || !lt(&s, &N) {
            return false;
        }
        let mut e = from_be(digest).unwrap_or([0; 4]);
        if !lt(&e, &N) {
            e = sub4(&e, &N).0;
        }
        let w = inv_mod_n(&s);
        let u1 = mul_mod_n(&e, &w);
        let u2 = mul_mod_n(&r, &w);
        let acc = self.mul_add(&u1, &u2);
        if acc.z.is_zero() {
            return false;
        }
        // x(R) mod n == r, checked as X == r·Z² (and (r+n)·Z² when r + n < p)
        // without leaving Jacobian coordinates.
        let z2 = acc.z.sqr();
        if Fe::from_plain(&r).mul(&z2) == acc.x {
            return true;
        }
        if lt(&r, &P_MINUS_N) {
            let rn = add4(&r, &N).0;
            return Fe::from_plain(&rn).mul(&z2) == acc.x;
        }
        false
    }

    /// u1·G + u2·Q for scalars below n.
    fn mul_add(&self, u1: &Limbs, u2: &Limbs) -> Jac {
        let mut acc = Jac::INFINITY;
        for i in (0..SPACING).rev() {
            acc = acc.double();
            let mut b = 0;
            for j in 0..TEETH {
                b |= bit(u2, SPACING * j + i) << j;
            }
            if b != 0 {
                acc = acc.add_affine(&self.table[b - 1]);
            }
        }
        add_g_multiple(acc, u1)
    }

    /// Bytes of table this key holds.
    pub fn table_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.table)
    }
}

// ---------------------------------------------------------------- signing

/// ECDSA P-256 (SHA-256) signing for *simulated* nodes — load generators
/// and tests whose software keys guard nothing. Not for real keys: it runs
/// in variable time (its timing reveals the nonce and so the key), and the
/// caller supplies the randomness. What it buys: presignatures (r, k⁻¹)
/// computed ahead of time, so that signing a quote costs two scalar
/// multiplications mod n and a load generator leaves the CPU to the
/// verifier it measures. Its signatures are ordinary ECDSA (tests check
/// them with ring).
pub struct SimSigner {
    d: Limbs,
    /// Unused presignatures (r, k⁻¹ mod n).
    pre: Vec<(Limbs, Limbs)>,
}

impl std::fmt::Debug for SimSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSigner")
            .field("presignatures", &self.pre.len())
            .finish_non_exhaustive()
    }
}

impl SimSigner {
    /// A signer for the secret scalar `secret` (big-endian; must be in
    /// [1, n-1]), with its public key as an uncompressed point.
    pub fn new(secret: &[u8; 32]) -> Option<(Self, [u8; 65])> {
        let d = from_be(secret)?;
        if is_zero(&d) || !lt(&d, &N) {
            return None;
        }
        let (x, y) = to_affine_plain(&add_g_multiple(Jac::INFINITY, &d))?;
        let mut point = [4u8; 65];
        for i in 0..4 {
            point[1 + 8 * i..9 + 8 * i].copy_from_slice(&x[3 - i].to_be_bytes());
            point[33 + 8 * i..41 + 8 * i].copy_from_slice(&y[3 - i].to_be_bytes());
        }
        Some((Self { d, pre: Vec::new() }, point))
    }

    /// Adds a presignature for the nonce `k` (32 random bytes from the
    /// caller; refused, returning false, when not in [1, n-1] or r = 0).
    pub fn presign(&mut self, k: &[u8; 32]) -> bool {
        let Some(k) = from_be(k) else { return false };
        if is_zero(&k) || !lt(&k, &N) {
            return false;
        }
        let Some((x, _)) = to_affine_plain(&add_g_multiple(Jac::INFINITY, &k)) else {
            return false;
        };
        let r = if lt(&x, &N) { x } else { sub4(&x, &N).0 };
        if is_zero(&r) {
            return false;
        }
        self.pre.push((r, inv_mod_n(&k)));
        true
    }

    /// Presignatures left.
    pub fn presigned(&self) -> usize {
        self.pre.len()
    }

    /// Signs SHA-256(`msg`) with the next presignature: (r, s) big-endian,
    /// or `None` when none is left.
    pub fn sign(&mut self, msg: &[u8]) -> Option<([u8; 32], [u8; 32])> {
        let digest: [u8; 32] = Sha256::digest(msg).into();
        let mut e = from_be(&digest)?;
        if !lt(&e, &N) {
            e = sub4(&e, &N).0;
        }
        loop {
            let (r, kinv) = self.pre.pop()?;
            let s = mul_mod_n(&kinv, &add_mod(&e, &mul_mod_n(&r, &self.d), &N));
            if is_zero(&s) {
                continue; // negligible; take the next presignature
            }
            return Some((to_be32(&r), to_be32(&s)));
        }
    }
}

fn to_be32(a: &Limbs) -> [u8; 32] {
    let mut out = [0u8; 32];
    for i in 0..4 {
        out[8 * i..8 * i + 8].copy_from_slice(&a[3 - i].to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
        ECDSA_P256_SHA256_FIXED_SIGNING,
    };

    fn doubled(mut a: Limbs, times: usize, m: &Limbs) -> Limbs {
        for _ in 0..times {
            a = add_mod(&a, &a, m);
        }
        a
    }

    #[test]
    fn constants_are_what_they_claim() {
        assert_eq!(N[0].wrapping_mul(N_INV), u64::MAX);
        assert_eq!(P[0].wrapping_mul(P_INV), u64::MAX);
        // 2^256 mod m, doubled 256 more times = 2^512 mod m.
        let r_p = sub4(&[0; 4], &P).0;
        assert_eq!(Fe::ONE.0, r_p);
        assert_eq!(doubled(r_p, 256, &P), R2_P);
        let r_n = sub4(&[0; 4], &N).0;
        assert_eq!(doubled(r_n, 256, &N), R2_N);
        assert_eq!(sub4(&P, &N).0, P_MINUS_N);
        // G is on the curve.
        let k = P256Key::new(&be(&GX), &be(&GY)).unwrap();
        assert_eq!(k.table.len(), (1 << TEETH) - 1);
    }

    fn be(a: &Limbs) -> Vec<u8> {
        a.iter().rev().flat_map(|l| l.to_be_bytes()).collect()
    }

    fn generic_mul(p: &Affine, k: &Limbs) -> Jac {
        let mut acc = Jac::INFINITY;
        for i in (0..256).rev() {
            acc = acc.double();
            if bit(k, i) == 1 {
                acc = acc.add_affine(p);
            }
        }
        acc
    }

    fn same_point(a: &Jac, b: &Jac) -> bool {
        if a.z.is_zero() || b.z.is_zero() {
            return a.z.is_zero() && b.z.is_zero();
        }
        let (az2, bz2) = (a.z.sqr(), b.z.sqr());
        a.x.mul(&bz2) == b.x.mul(&az2) && a.y.mul(&bz2.mul(&b.z)) == b.y.mul(&az2.mul(&a.z))
    }

    fn g() -> Affine {
        Affine {
            x: Fe::from_plain(&GX),
            y: Fe::from_plain(&GY),
        }
    }

    fn limbs_strategy() -> impl Strategy<Value = Limbs> {
        any::<[u64; 4]>().prop_map(|mut a| {
            while !lt(&a, &N) {
                a = sub4(&a, &N).0;
            }
            a
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn comb_and_windows_agree_with_double_and_add(u1 in limbs_strategy(), u2 in limbs_strategy()) {
            let key = P256Key::new(&be(&GX), &be(&GY)).unwrap();
            // Q = G here, so u1·G + u2·G = (u1 + u2)·G.
            let want = generic_mul(&g(), &add_mod(&u1, &u2, &N));
            prop_assert!(same_point(&key.mul_add(&u1, &u2), &want));
        }

        #[test]
        fn field_ops_agree(a in limbs_strategy(), b in limbs_strategy()) {
            let (fa, fb) = (Fe::from_plain(&a), Fe::from_plain(&b));
            prop_assert_eq!(fa.sqr(), fa.mul(&fa));
            prop_assert_eq!(fa.add(&fb).sub(&fb), fa);
            prop_assert_eq!(fa.mul(&fb).to_plain(), fb.mul(&fa).to_plain());
            if !fa.is_zero() {
                prop_assert_eq!(fa.mul(&fa.invert()), Fe::ONE);
            }
            if !is_zero(&a) {
                prop_assert_eq!(mul_mod_n(&a, &inv_mod_n(&a)), [1, 0, 0, 0]);
            }
        }

        #[test]
        fn agrees_with_ring(msg in proptest::collection::vec(any::<u8>(), 0..64), flip in 0usize..(64 * 8)) {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
            let pt = kp.public_key().as_ref();
            let key = P256Key::new(&pt[1..33], &pt[33..]).unwrap();
            let sig = kp.sign(&rng, &msg).unwrap();
            let sig = sig.as_ref();
            prop_assert!(key.verify(&msg, &sig[..32], &sig[32..]));
            let mut bad = sig.to_vec();
            bad[flip / 8] ^= 1 << (flip % 8);
            let ring_ok = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pt).verify(&msg, &bad).is_ok();
            prop_assert_eq!(key.verify(&msg, &bad[..32], &bad[32..]), ring_ok);
            prop_assert!(!ring_ok);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            x in proptest::collection::vec(any::<u8>(), 0..40),
            y in proptest::collection::vec(any::<u8>(), 0..40),
            r in proptest::collection::vec(any::<u8>(), 0..40),
            s in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let _ = P256Key::new(&x, &y);
            let key = P256Key::new(&be(&GX), &be(&GY)).unwrap();
            // A random (r, s) verifies with negligible probability.
            prop_assert!(!key.verify(b"quote", &r, &s));
        }
    }

    #[test]
    fn sim_signer_signatures_verify_with_ring() {
        use ring::rand::SecureRandom;
        let rng = SystemRandom::new();
        let mut secret = [0u8; 32];
        rng.fill(&mut secret).unwrap();
        secret[0] &= 0x7f; // below n
        let (mut signer, point) = SimSigner::new(&secret).unwrap();
        let ring_key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point.to_vec());
        let own = P256Key::new(&point[1..33], &point[33..]).unwrap();
        for i in 0..32u8 {
            let mut k = [0u8; 32];
            rng.fill(&mut k).unwrap();
            k[0] &= 0x7f;
            assert!(signer.presign(&k));
            let msg = [i; 77];
            let (r, s) = signer.sign(&msg).unwrap();
            let mut rs = r.to_vec();
            rs.extend_from_slice(&s);
            assert!(
                ring_key.verify(&msg, &rs).is_ok(),
                "ring rejects signature {i}"
            );
            assert!(own.verify(&msg, &r, &s));
            assert!(ring_key.verify(b"other", &rs).is_err());
        }
        assert_eq!(signer.sign(b"none left"), None);
        assert!(SimSigner::new(&[0u8; 32]).is_none());
        assert!(SimSigner::new(&[0xff; 32]).is_none());
    }

    #[test]
    fn special_scalars() {
        let key = P256Key::new(&be(&GX), &be(&GY)).unwrap();
        let n1 = sub4(&N, &[1, 0, 0, 0]).0;
        for (u1, u2) in [
            ([0; 4], [1, 0, 0, 0]),
            ([1, 0, 0, 0], [0; 4]),
            ([1, 0, 0, 0], [1, 0, 0, 0]),
            (n1, [1, 0, 0, 0]),
            (n1, n1),
            ([0, 0, 0, 1 << 63], [0, 0, 0, 1 << 63]),
            (n1, [2, 0, 0, 0]),
        ] {
            let want = generic_mul(&g(), &add_mod(&u1, &u2, &N));
            assert!(same_point(&key.mul_add(&u1, &u2), &want), "{u1:x?} {u2:x?}");
        }
    }

    #[test]
    fn wycheproof_p1363_vectors() {
        use wycheproof::ecdsa::{TestName, TestSet};
        use wycheproof::TestResult;
        let set = TestSet::load(TestName::EcdsaSecp256r1Sha256P1363).unwrap();
        let mut checked = 0;
        for group in &set.test_groups {
            let pt: &[u8] = &group.key.key;
            let key = if pt.len() == 65 && pt[0] == 4 {
                P256Key::new(&pt[1..33], &pt[33..])
            } else {
                Err(P256KeyError::NotOnCurve)
            };
            for t in &group.tests {
                let sig: &[u8] = &t.sig;
                let ok = match &key {
                    Ok(k) if sig.len() == 64 => k.verify(&t.msg, &sig[..32], &sig[32..]),
                    _ => false,
                };
                match t.result {
                    TestResult::Valid => assert!(ok, "valid vector {} rejected", t.tc_id),
                    TestResult::Invalid => assert!(!ok, "invalid vector {} accepted", t.tc_id),
                    TestResult::Acceptable => {}
                }
                checked += 1;
            }
        }
        assert!(checked >= 250, "only {checked} vectors");
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(
            P256Key::new(&[0u8; 33], &[0u8; 32]),
            Err(P256KeyError::CoordinateTooLong)
        );
        assert_eq!(
            P256Key::new(&be(&P), &be(&GY)),
            Err(P256KeyError::CoordinateOutOfRange)
        );
        let mut y = be(&GY);
        y[31] ^= 1;
        assert_eq!(P256Key::new(&be(&GX), &y), Err(P256KeyError::NotOnCurve));
    }
}
