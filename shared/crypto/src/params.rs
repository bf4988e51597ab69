//! Named cryptographic parameters. SECURITY.md gives the security source and the noise and
//! rounding budget of each.

/// GLWE polynomial size N: values packed per ciphertext. Source: tfhe-rs 1.8
/// `V1_4_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128` (GLWE side), 128-bit security.
pub const POLYNOMIAL_SIZE: usize = 2048;

/// GLWE dimension k (mask polynomials per ciphertext), same source as [`POLYNOMIAL_SIZE`].
pub const GLWE_DIMENSION: usize = 1;

/// log2 of the bound B of the TUniform noise distribution: each noise coefficient is drawn
/// from [-2^B, 2^B]. Same source as [`POLYNOMIAL_SIZE`].
pub const NOISE_TUNIFORM_LOG2: u32 = 17;

/// Ciphertext modulus: the native 2^64 of u64 arithmetic.
pub const CIPHERTEXT_MODULUS_LOG2: u32 = 64;

/// Largest number of clients whose contributions may be summed in one round. The noise and
/// rounding budget (SECURITY.md) is computed for this count.
pub const MAX_CLIENTS: usize = 1000;

/// Bits of each ciphertext body coefficient that travel (the top ones, rounded to nearest).
/// Dropping low bits of a body is public post-processing of the ciphertext: it cannot lower
/// security, it only adds a rounding error of at most 2^(63 - bits) per client and
/// coefficient, which the client knows and feeds back into its error-feedback residual
/// (`Encryptor::encrypt_chunk`'s `delivered`). SECURITY.md, "Noise and rounding budget",
/// gives the precision and the client cap of each width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct BodyBits(u8);

impl BodyBits {
    /// The widths supported: whole bytes.
    pub const ALLOWED: [u8; 4] = [8, 16, 24, 32];
    /// 32 bits (4 bytes per value): the most precise; the host's width when no narrower one
    /// suits the fleet ([`narrowest_body`]).
    pub const FULL: BodyBits = BodyBits(32);

    /// A width of `bits`, one of [`Self::ALLOWED`].
    pub fn new(bits: u32) -> Result<Self, crate::CryptoError> {
        match u8::try_from(bits) {
            Ok(b) if Self::ALLOWED.contains(&b) => Ok(Self(b)),
            _ => Err(crate::CryptoError::InvalidParameter(format!(
                "body width must be one of {:?} bits, got {bits}",
                Self::ALLOWED
            ))),
        }
    }

    /// The width in bits.
    pub fn bits(self) -> u32 {
        self.0 as u32
    }

    /// Bytes per body on the wire.
    pub fn bytes(self) -> usize {
        self.0 as usize / 8
    }

    /// log2 of the largest body rounding error, 2^(63 - bits), in units of 2^-64 of the
    /// modulus.
    pub fn rounding_log2(self) -> u32 {
        63 - self.bits()
    }

    /// The top `bits` of a body coefficient, rounded to nearest.
    pub fn truncate(self, body: u64) -> u32 {
        (body.wrapping_add(1 << self.rounding_log2()) >> (64 - self.bits())) as u32
    }

    /// A truncated body back in Z/2^64 (its dropped bits zero).
    pub fn expand(self, truncated: u32) -> u64 {
        (truncated as u64) << (64 - self.bits())
    }

    /// Reduces a sum of truncated bodies modulo 2^bits.
    pub fn reduce(self, sum: u32) -> u32 {
        if self.0 == 32 {
            sum
        } else {
            sum & ((1u32 << self.0) - 1)
        }
    }
}

impl TryFrom<u8> for BodyBits {
    type Error = crate::CryptoError;
    fn try_from(bits: u8) -> Result<Self, Self::Error> {
        Self::new(bits as u32)
    }
}

impl From<BodyBits> for u8 {
    fn from(b: BodyBits) -> u8 {
        b.0
    }
}

impl std::fmt::Display for BodyBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Worst-case decryption error of a sum of `clients` contributions, in units of 2^-64 of the
/// modulus: per client the encryption noise (2^[`NOISE_TUNIFORM_LOG2`]), the body rounding
/// (2^(63 - bits)) and the encoding's rounding (1/2, counted as 1).
pub fn worst_case_error(clients: usize, body: BodyBits) -> u128 {
    clients as u128 * ((1u128 << NOISE_TUNIFORM_LOG2) + (1u128 << body.rounding_log2()) + 1)
}

/// The most clients whose contributions one round may sum with bodies of width `body` and a
/// fixed-point scale of 2^`scale_log2`: the weighted mean (at most 2^scale_log2 in magnitude)
/// plus [`worst_case_error`] must stay below 2^63 so that the signed decoding never wraps,
/// and never more than [`MAX_CLIENTS`]. 32, 24 and 16 bits: 1,000 at every scale up to 62;
/// 8 bits: 223 at scale 60 (the default), 127 at 62.
pub fn max_clients(body: BodyBits, scale_log2: u32) -> usize {
    let room = (1u128 << 63).saturating_sub(1u128 << scale_log2.min(63));
    let per_client = worst_case_error(1, body);
    // Strictly below 2^63: the largest n with n * per_client < room.
    let wrap_cap = room.saturating_sub(1) / per_client;
    wrap_cap.min(MAX_CLIENTS as u128) as usize
}

/// The finest fixed-point scale (at most 2^62) at which `clients` contributions with bodies of
/// width `body` still fit [`max_clients`]; `None` when no scale down to 2^8 does. The finer
/// the scale, the smaller each client's rounding relative to its values: 8-bit bodies for
/// three clients get 4x finer steps at 2^62 than at the default 2^60.
pub fn finest_scale(body: BodyBits, clients: usize) -> Option<u32> {
    (8..=62).rev().find(|&s| max_clients(body, s) >= clients)
}

/// log2 of the largest per-client rounding step, relative to the clip value, that
/// [`narrowest_body`] accepts: 1/8 of the clip. The step a client's values move in is
/// C 2^(64 - bits - scale) / weight; the error feedback carries each rounding into a later
/// round, so a step well above a round's typical update only delays it, but steps near the
/// clip would make most of a round's values round to zero.
pub const AUTO_STEP_LOG2: i32 = -3;

/// The narrowest body width for a fleet of `clients` equally weighted devices whose
/// per-client step at the width's [`finest_scale`] is at most 2^[`AUTO_STEP_LOG2`] of the
/// clip: 8 bits up to 8 clients, 16 bits up to 1,000 (the quality experiment: rho = 50% with
/// 8-bit bodies for 3 clients ends 0.5% below dense FedAvg at 0.5 bytes per parameter).
/// `None` beyond [`MAX_CLIENTS`].
pub fn narrowest_body(clients: usize) -> Option<BodyBits> {
    let clients = clients.max(1);
    BodyBits::ALLOWED.iter().find_map(|&bits| {
        let body = BodyBits::new(bits as u32).ok()?;
        let scale = finest_scale(body, clients)?;
        // step / clip = 2^(64 - bits - scale) * clients <= 2^AUTO_STEP_LOG2
        let step_log2 = 64 - bits as i32 - scale as i32;
        let fits = (clients as f64).log2() + step_log2 as f64 <= AUTO_STEP_LOG2 as f64;
        fits.then_some(body)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_widths_round_trip_and_reject_others() {
        for bits in BodyBits::ALLOWED {
            let b = BodyBits::new(bits as u32).unwrap();
            assert_eq!(b.bytes() * 8, bits as usize);
            // Rounding to nearest: a body within 2^(63 - bits) of a multiple of
            // 2^(64 - bits) truncates to that multiple.
            let step = 1u64 << (64 - bits as u32);
            let near = 5 * step;
            for off in [0i64, 1, -1, (step / 2 - 1) as i64, -((step / 2) as i64)] {
                let t = b.truncate(near.wrapping_add(off as u64));
                assert_eq!(b.expand(t), near, "bits {bits} offset {off}");
            }
        }
        for bad in [0u32, 7, 12, 33, 64, 256] {
            assert!(BodyBits::new(bad).is_err(), "{bad}");
        }
        assert!(postcard::from_bytes::<BodyBits>(&[12]).is_err());
        assert_eq!(postcard::from_bytes::<BodyBits>(&[16]).unwrap().bits(), 16);
    }

    #[test]
    fn client_caps_keep_the_decoding_from_wrapping() {
        for bits in BodyBits::ALLOWED {
            let body = BodyBits::new(bits as u32).unwrap();
            for scale in [56u32, 60, 62] {
                let n = max_clients(body, scale);
                assert!(n >= 1, "bits {bits} scale {scale}");
                let total = (1u128 << scale) + worst_case_error(n, body);
                assert!(
                    total < 1u128 << 63,
                    "bits {bits} scale {scale}: {n} clients"
                );
                if n < MAX_CLIENTS {
                    // One more client could wrap.
                    let over = (1u128 << scale) + worst_case_error(n + 1, body);
                    assert!(over >= 1u128 << 63, "bits {bits} scale {scale}");
                }
            }
        }
        assert_eq!(max_clients(BodyBits::new(8).unwrap(), 60), 223);
        assert_eq!(max_clients(BodyBits::new(8).unwrap(), 62), 127);
        assert_eq!(max_clients(BodyBits::new(16).unwrap(), 62), MAX_CLIENTS);
        assert_eq!(max_clients(BodyBits::FULL, 62), MAX_CLIENTS);
        let b8 = BodyBits::new(8).unwrap();
        assert_eq!(finest_scale(b8, 3), Some(62));
        assert_eq!(finest_scale(b8, 200), Some(60));
        assert_eq!(finest_scale(b8, 224), Some(59));
        assert_eq!(finest_scale(BodyBits::FULL, MAX_CLIENTS), Some(62));
        assert_eq!(finest_scale(BodyBits::FULL, MAX_CLIENTS + 1), None);
    }

    #[test]
    fn the_narrowest_body_keeps_the_step_within_an_eighth_of_the_clip() {
        let b = |bits| Some(BodyBits::new(bits).unwrap());
        assert_eq!(narrowest_body(1), b(8));
        assert_eq!(narrowest_body(3), b(8));
        assert_eq!(narrowest_body(8), b(8));
        assert_eq!(narrowest_body(9), b(16));
        assert_eq!(narrowest_body(MAX_CLIENTS), b(16));
        assert_eq!(narrowest_body(MAX_CLIENTS + 1), None);
    }
}
