//! Passwords (PBKDF2-HMAC-SHA256 with a random salt) and session tokens
//! (HS256 JWTs). Pure functions apart from `random_bytes`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// PBKDF2 iterations for new accounts (stored per account, so raising it
/// later keeps old hashes verifiable).
pub const PBKDF2_ITERATIONS: u32 = 20_000;
/// Fewer than this is refused when verifying a stored hash.
pub const MIN_ITERATIONS: u32 = 10_000;
pub const SALT_BYTES: usize = 16;
pub const HASH_BYTES: usize = 32;

/// How long a session token is valid.
pub const TOKEN_SECONDS: u64 = 12 * 60 * 60;

/// `len` bytes from `wasi:random` (a CSPRNG on the host).
pub fn random_bytes(len: usize) -> Vec<u8> {
    wasip2::random::random::get_random_bytes(len as u64)
}

/// PBKDF2-HMAC-SHA256 of `password` with `salt`.
pub fn hash_password(password: &str, salt: &[u8], iterations: u32) -> [u8; HASH_BYTES] {
    let mut out = [0u8; HASH_BYTES];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut out);
    out
}

/// Whether `password` matches a stored hash, compared in constant time.
pub fn verify_password(password: &str, salt: &[u8], iterations: u32, stored: &[u8]) -> bool {
    if iterations < MIN_ITERATIONS || stored.len() != HASH_BYTES {
        return false;
    }
    let computed = hash_password(password, salt, iterations);
    constant_time_eq(&computed, stored)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An HS256 JWT with claims `sub`, `iat` and `exp` (seconds since the
/// epoch), signed with `secret`.
pub fn sign_token(secret: &[u8], user: &str, now_seconds: u64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({
        "sub": user,
        "iat": now_seconds,
        "exp": now_seconds + TOKEN_SECONDS,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any size");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_rfc_7914_vector() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256("passwd", "salt", 1, 64).
        let mut out = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<Sha256>(b"passwd", b"salt", 1, &mut out);
        assert_eq!(out[..8], [0x55, 0xac, 0x04, 0x6e, 0x56, 0xe3, 0x08, 0x9f]);
    }

    #[test]
    fn verify_accepts_the_password_and_refuses_others() {
        let salt = [7u8; SALT_BYTES];
        let stored = hash_password("hunter22", &salt, MIN_ITERATIONS);
        assert!(verify_password("hunter22", &salt, MIN_ITERATIONS, &stored));
        assert!(!verify_password("hunter23", &salt, MIN_ITERATIONS, &stored));
        assert!(!verify_password("hunter22", &salt, 1, &stored));
    }

    #[test]
    fn token_has_three_parts_and_the_claims() {
        let t = sign_token(b"secret", "alice", 1000);
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["exp"], 1000 + TOKEN_SECONDS);
    }
}
