//! Bearer-token (JWT) verification for `edge-operations.authenticate-user`.
//!
//! [`Authenticator::from_config`] resolves every key of `[auth]` once (env
//! variables, files, PEM parsing) and reports problems as [`Diagnostics`] at
//! the key's place in `keel.toml`. [`Authenticator::authenticate`] then
//! verifies a compact JWS and turns its claims into a [`Session`].
//!
//! Rules:
//! - The token is at most [`MAX_TOKEN_BYTES`]; `alg: none` is never accepted.
//! - Key choice: a token naming a `kid` is verified only with the key of that
//!   `kid`; one without uses the key configured for its `alg` (the kid-less
//!   one, else the only one). The key's configured algorithm must equal the
//!   header's `alg`, so an HMAC token can never be checked against an RSA
//!   public key used as a secret (algorithm confusion).
//! - The signature is checked before any claim is looked at.
//! - `exp` is required; `nbf` is checked when present, both with the
//!   configured leeway; `iss`/`aud` when configured; `sub` must be a
//!   non-empty string; every `required-claims` entry must be present.
//! - Nothing here panics on any input.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey};
use keel_config::{AuthConfig, AuthKey, Diagnostic, Diagnostics, JwtAlgorithm, KeySource};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest token accepted (bytes).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest key file read (bytes).
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// How much of a token-supplied string (kid, alg) is echoed in errors.
const ECHO_CHARS: usize = 64;

/// A verified token: who its bearer is. Mirrors WIT `user-session` (without
/// `home-region`, which comes from the user directory, not the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// `sub`.
    pub user: String,
    /// `sid`, else `jti` (string claims only).
    pub session_id: Option<String>,
    /// `iat` in milliseconds, 0 when absent.
    pub issued_at_ms: u64,
    /// `exp` in milliseconds.
    pub expires_at_ms: u64,
    /// From `scope` (space-separated string), `scp`, `scopes` and `roles`
    /// (each a list of strings or a space-separated string), first
    /// occurrence order, without duplicates.
    pub scopes: Vec<String>,
    /// Every other top-level claim whose value is a string, sorted by name
    /// (all string claims except `sub`, `scope` and the one that gave
    /// `session_id`).
    pub claims: Vec<(String, String)>,
}

/// Why a token was refused. Mirrors WIT `auth-error`; the strings are
/// human-readable explanations for logs and developers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("bad signature")]
    BadSignature,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unknown signing key: {0}")]
    UnknownKey(String),
    #[error("unsupported algorithm: {0}")]
    UnsupportedAlgorithm(String),
    #[error("claim mismatch: {0}")]
    ClaimMismatch(String),
    /// Never returned by this crate (there is no revocation list yet); here
    /// so the mapping to WIT `auth-error` is one-to-one.
    #[error("token revoked")]
    Revoked,
    #[error("authentication unavailable: {0}")]
    Unavailable(String),
}

/// Verifies tokens against the keys of `[auth]`. Cheap to share (`Send + Sync`);
/// decoding keys are built once.
#[derive(Debug, Clone)]
pub struct Authenticator {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Vec<String>,
    leeway_ms: u64,
    required_claims: Vec<String>,
}

#[derive(Debug, Clone)]
struct Key {
    kid: Option<String>,
    algorithm: JwtAlgorithm,
    jwt_alg: Algorithm,
    decoding: DecodingKey,
}

impl Authenticator {
    /// Reads every key source (env variables, files) and parses the keys.
    /// Every problem is reported, each at its key's place in `keel.toml`.
    pub fn from_config(cfg: &AuthConfig) -> Result<Authenticator, Diagnostics> {
        let mut diags = Vec::new();
        let mut keys = Vec::new();
        for k in &cfg.keys {
            match load_key(k) {
                Ok(decoding) => keys.push(Key {
                    kid: k.kid.clone(),
                    algorithm: k.algorithm,
                    jwt_alg: jwt_algorithm(k.algorithm),
                    decoding,
                }),
                Err(message) => {
                    diags.push(Diagnostic::new(k.location.clone(), k.key.clone(), message))
                }
            }
        }
        if !diags.is_empty() {
            return Err(Diagnostics(diags));
        }
        Ok(Authenticator {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway_ms: u64::try_from(cfg.leeway.as_millis()).unwrap_or(u64::MAX),
            required_claims: cfg.required_claims.clone(),
        })
    }

    /// Whether any key is configured (otherwise every token is `Unavailable`).
    pub fn is_configured(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Verifies `token` (a compact JWS, without any `Bearer ` prefix) now.
    pub fn authenticate(&self, token: &str) -> Result<Session, AuthError> {
        self.authenticate_at(token, SystemTime::now())
    }

    fn authenticate_at(&self, token: &str, now: SystemTime) -> Result<Session, AuthError> {
        if self.keys.is_empty() {
            return Err(AuthError::Unavailable(
                "no [auth] keys configured on this node".into(),
            ));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(malformed(format!(
                "token is {} bytes; at most {MAX_TOKEN_BYTES} are accepted",
                token.len()
            )));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            let n = token.split('.').count();
            return Err(malformed(if n == 5 {
                "encrypted tokens (JWE) are not supported".to_string()
            } else {
                format!("expected a JWS: three base64url parts separated by '.', found {n} part(s)")
            }));
        };

        let header = b64url_decode(h).ok_or_else(|| malformed("header is not base64url"))?;
        let header = parse_object(&header)
            .map_err(|e| malformed(format!("header is not a JSON object: {e}")))?;
        if header.contains_key("crit") {
            return Err(malformed(
                "critical header extensions (crit) are not supported",
            ));
        }
        let alg = match header.get("alg") {
            Some(Value::String(a)) => a.as_str(),
            Some(_) => return Err(malformed("header alg is not a string")),
            None => return Err(malformed("header has no alg")),
        };
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(malformed("header kid is not a string")),
        };
        if alg.eq_ignore_ascii_case("none") {
            return Err(AuthError::UnsupportedAlgorithm(
                "none: unsigned tokens are never accepted".into(),
            ));
        }
        let key = self.select_key(alg, kid)?;

        // The signing input is the first two parts as written.
        let signing_input = &token.as_bytes()[..h.len() + 1 + p.len()];
        match jsonwebtoken::crypto::verify(s, signing_input, &key.decoding, key.jwt_alg) {
            Ok(true) => {}
            Ok(false) => return Err(AuthError::BadSignature),
            Err(e) if matches!(e.kind(), ErrorKind::Base64(_)) => {
                return Err(malformed("signature is not base64url"));
            }
            Err(_) => return Err(AuthError::BadSignature),
        }

        let payload = b64url_decode(p).ok_or_else(|| malformed("payload is not base64url"))?;
        let claims = parse_object(&payload)
            .map_err(|e| malformed(format!("payload is not a JSON object: {e}")))?;
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.session(claims, now_ms)
    }

    fn select_key(&self, alg: &str, kid: Option<&str>) -> Result<&Key, AuthError> {
        if let Some(kid) = kid {
            let key = self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| {
                    AuthError::UnknownKey(format!(
                        "kid {} is not configured on this node",
                        echo(kid)
                    ))
                })?;
            if key.algorithm.name() != alg {
                return Err(AuthError::UnsupportedAlgorithm(format!(
                    "{}: key {} is configured for {}",
                    JwtAlgorithm::from_name(alg).map_or_else(|| echo(alg), |a| a.to_string()),
                    echo(kid),
                    key.algorithm
                )));
            }
            return Ok(key);
        }
        let Some(a) = JwtAlgorithm::from_name(alg) else {
            return Err(AuthError::UnsupportedAlgorithm(format!(
                "{}: not a supported algorithm",
                echo(alg)
            )));
        };
        if let Some(k) = self
            .keys
            .iter()
            .find(|k| k.kid.is_none() && k.algorithm == a)
        {
            return Ok(k);
        }
        let candidates: Vec<&Key> = self.keys.iter().filter(|k| k.algorithm == a).collect();
        match candidates.as_slice() {
            [] => Err(AuthError::UnsupportedAlgorithm(format!(
                "{a}: no key for this algorithm is configured on this node"
            ))),
            [k] => Ok(k),
            several => Err(AuthError::UnknownKey(format!(
                "the token names no kid and {} {a} keys are configured; it must name one of {}",
                several.len(),
                several
                    .iter()
                    .filter_map(|k| k.kid.as_deref())
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Checks the (signature-verified) claims and builds the session.
    fn session(&self, claims: Map<String, Value>, now_ms: u64) -> Result<Session, AuthError> {
        for c in &self.required_claims {
            if claims.get(c).is_none_or(Value::is_null) {
                return Err(mismatch(format!("{c}: required claim is missing")));
            }
        }
        let user = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(mismatch("sub: must be a non-empty string")),
        };
        let expires_at_ms = numeric_date_ms(&claims, "exp")?
            .ok_or_else(|| mismatch("exp: required claim is missing"))?;
        if now_ms >= expires_at_ms.saturating_add(self.leeway_ms) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = numeric_date_ms(&claims, "nbf")?
            && now_ms.saturating_add(self.leeway_ms) < nbf
        {
            return Err(AuthError::NotYetValid);
        }
        let issued_at_ms = numeric_date_ms(&claims, "iat")?.unwrap_or(0);

        if let Some(want) = &self.issuer {
            match claims.get("iss") {
                Some(Value::String(iss)) if iss == want => {}
                Some(Value::String(_)) => {
                    return Err(mismatch(format!(
                        "iss: the token's issuer is not the configured {want:?}"
                    )));
                }
                None | Some(Value::Null) => {
                    return Err(mismatch(format!("iss: missing; expected {want:?}")));
                }
                Some(_) => return Err(mismatch("iss: must be a string")),
            }
        }
        if !self.audience.is_empty() {
            let accepted = |a: &str| self.audience.iter().any(|w| w == a);
            let expected = || {
                self.audience
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => accepted(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .any(|v| matches!(v, Value::String(a) if accepted(a))),
                None | Some(Value::Null) => {
                    return Err(mismatch(format!(
                        "aud: missing; expected one of {}",
                        expected()
                    )));
                }
                Some(_) => return Err(mismatch("aud: must be a string or a list of strings")),
            };
            if !ok {
                return Err(mismatch(format!(
                    "aud: none of the token's audiences is accepted (expected one of {})",
                    expected()
                )));
            }
        }

        let (session_id, session_claim) = match (claims.get("sid"), claims.get("jti")) {
            (Some(Value::String(s)), _) => (Some(s.clone()), Some("sid")),
            (_, Some(Value::String(j))) => (Some(j.clone()), Some("jti")),
            _ => (None, None),
        };

        let mut scopes: Vec<String> = Vec::new();
        for name in ["scope", "scp", "scopes", "roles"] {
            let mut add = |s: &str| {
                if !s.is_empty() && !scopes.iter().any(|x| x == s) {
                    scopes.push(s.to_string());
                }
            };
            match claims.get(name) {
                Some(Value::String(s)) => s.split_whitespace().for_each(&mut add),
                Some(Value::Array(list)) => {
                    list.iter().filter_map(Value::as_str).for_each(&mut add)
                }
                _ => {}
            }
        }

        let mut other: Vec<(String, String)> = claims
            .into_iter()
            .filter(|(k, _)| k != "sub" && k != "scope" && Some(k.as_str()) != session_claim)
            .filter_map(|(k, v)| match v {
                Value::String(s) => Some((k, s)),
                _ => None,
            })
            .collect();
        other.sort_by(|a, b| a.0.cmp(&b.0));

        Ok(Session {
            user,
            session_id,
            issued_at_ms,
            expires_at_ms,
            scopes,
            claims: other,
        })
    }
}

fn malformed(m: impl Into<String>) -> AuthError {
    AuthError::Malformed(m.into())
}

fn mismatch(m: impl Into<String>) -> AuthError {
    AuthError::ClaimMismatch(m.into())
}

/// A token-supplied string, quoted and shortened for an error message.
fn echo(s: &str) -> String {
    if s.chars().count() > ECHO_CHARS {
        format!("{:?}…", s.chars().take(ECHO_CHARS).collect::<String>())
    } else {
        format!("{s:?}")
    }
}

/// A NumericDate claim (seconds since the epoch, possibly fractional) in
/// milliseconds; `None` when absent or null.
fn numeric_date_ms(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, AuthError> {
    let bad = || {
        mismatch(format!(
            "{name}: must be a NumericDate (seconds since 1970)"
        ))
    };
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(secs) = n.as_u64() {
                Ok(Some(secs.saturating_mul(1000)))
            } else {
                match n.as_f64() {
                    // `as` saturates; the range check rules out negatives.
                    Some(f) if f.is_finite() && f >= 0.0 => Ok(Some((f * 1000.0) as u64)),
                    _ => Err(bad()),
                }
            }
        }
        Some(_) => Err(bad()),
    }
}

/// Base64url without padding, canonical (unused trailing bits must be zero).
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3 + 2);
    for chunk in bytes.chunks(4) {
        let mut acc: u32 = 0;
        for &c in chunk {
            acc = (acc << 6) | val(c)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 if acc & 0b11 == 0 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
            2 if acc & 0b1111 == 0 => out.push((acc >> 4) as u8),
            _ => return None,
        }
    }
    Some(out)
}

/// A JSON object whose member names are unique (duplicates make a token
/// ambiguous: different parsers would see different claims).
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<UniqueObject, A::Error> {
                let mut out = Map::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    if out.contains_key(&k) {
                        return Err(de::Error::custom(format_args!(
                            "duplicate member {}",
                            echo(&k)
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, serde_json::Error> {
    serde_json::from_slice::<UniqueObject>(bytes).map(|o| o.0)
}

// ---- keys ----

fn jwt_algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::HS384 => Algorithm::HS384,
        JwtAlgorithm::HS512 => Algorithm::HS512,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::PS384 => Algorithm::PS384,
        JwtAlgorithm::PS512 => Algorithm::PS512,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

/// What a source is, for messages.
fn describe(source: &KeySource) -> String {
    match source {
        KeySource::Inline(_) => "the inline value".into(),
        KeySource::Env(n) => format!("environment variable {n}"),
        KeySource::File(p) => format!("file {}", p.display()),
    }
}

fn read_source(source: &KeySource) -> Result<Vec<u8>, String> {
    match source {
        KeySource::Inline(v) => Ok(v.as_bytes().to_vec()),
        KeySource::Env(name) => match std::env::var_os(name) {
            None => Err(format!("environment variable {name} is not set")),
            Some(v) if v.is_empty() => Err(format!("environment variable {name} is empty")),
            Some(v) => Ok(v.into_encoded_bytes()),
        },
        KeySource::File(path) => {
            let mut buf = Vec::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_KEY_FILE_BYTES + 1).read_to_end(&mut buf))
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if buf.len() as u64 > MAX_KEY_FILE_BYTES {
                return Err(format!(
                    "file {} is larger than {} KiB; expected a key",
                    path.display(),
                    MAX_KEY_FILE_BYTES / 1024
                ));
            }
            if buf.is_empty() {
                return Err(format!("file {} is empty", path.display()));
            }
            Ok(buf)
        }
    }
}

fn load_key(k: &AuthKey) -> Result<DecodingKey, String> {
    let mut bytes = read_source(&k.source)?;
    let from = describe(&k.source);
    let alg = k.algorithm;
    let jwt_alg = jwt_algorithm(alg);

    if alg.is_hmac() {
        // A secret file usually ends with the newline its editor added.
        if matches!(k.source, KeySource::File(_)) {
            if bytes.ends_with(b"\r\n") {
                bytes.truncate(bytes.len() - 2);
            } else if bytes.ends_with(b"\n") {
                bytes.truncate(bytes.len() - 1);
            }
        }
        let min = match alg {
            JwtAlgorithm::HS384 => 48,
            JwtAlgorithm::HS512 => 64,
            _ => 32,
        };
        if bytes.len() < min {
            return Err(format!(
                "{alg} secrets must be at least {min} bytes (RFC 7518 §3.2); {from} has {}",
                bytes.len()
            ));
        }
        return Ok(DecodingKey::from_secret(&bytes));
    }

    let expected = match alg {
        JwtAlgorithm::ES256 => "a P-256 (prime256v1) EC public key in PEM (\"BEGIN PUBLIC KEY\")",
        JwtAlgorithm::ES384 => "a P-384 (secp384r1) EC public key in PEM (\"BEGIN PUBLIC KEY\")",
        JwtAlgorithm::EdDSA => "an Ed25519 public key in PEM (\"BEGIN PUBLIC KEY\")",
        _ => "an RSA public key in PEM (\"BEGIN PUBLIC KEY\" or \"BEGIN RSA PUBLIC KEY\")",
    };
    let text = String::from_utf8_lossy(&bytes);
    if text.contains("PRIVATE KEY-----") {
        return Err(format!(
            "{from} holds a private key; configure the public key instead (`openssl pkey -in private.pem -pubout`); accepted: {expected}"
        ));
    }
    if !text.contains("-----BEGIN ") {
        return Err(format!("{from} is not PEM; accepted: {expected}"));
    }
    let parsed = match alg {
        JwtAlgorithm::ES256 | JwtAlgorithm::ES384 => DecodingKey::from_ec_pem(&bytes),
        JwtAlgorithm::EdDSA => DecodingKey::from_ed_pem(&bytes),
        _ => DecodingKey::from_rsa_pem(&bytes),
    };
    let key = parsed.map_err(|e| format!("{from} is not {expected} ({e}) for {alg}"))?;

    if is_rsa(alg) {
        let der = key
            .try_get_as_bytes()
            .map_err(|e| format!("{from} is not {expected} ({e})"))?;
        let (bits, e) = rsa_public_key_params(der)
            .ok_or_else(|| format!("{from} is not {expected} (not an RSAPublicKey)"))?;
        if !(2048..=4096).contains(&bits) {
            return Err(format!(
                "{from} is a {bits}-bit RSA key; accepted: 2048 to 4096 bits (RFC 7518 §3.3)"
            ));
        }
        if e < 3 || e % 2 == 0 || e > (1 << 33) - 1 {
            return Err(format!(
                "{from} has an unusable RSA public exponent {e}; accepted: an odd exponent such as 65537"
            ));
        }
    }
    // Build the verifier once: rejects points that are not on the curve,
    // a P-384 key configured for ES256 and the like.
    jsonwebtoken::crypto::verify("", b"", &key, jwt_alg)
        .map_err(|_| format!("{from} is not {expected} usable for {alg}"))?;
    Ok(key)
}

fn is_rsa(a: JwtAlgorithm) -> bool {
    matches!(
        a,
        JwtAlgorithm::RS256
            | JwtAlgorithm::RS384
            | JwtAlgorithm::RS512
            | JwtAlgorithm::PS256
            | JwtAlgorithm::PS384
            | JwtAlgorithm::PS512
    )
}

/// One DER TLV: (tag, contents, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |l, &b| (l << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

/// PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`
/// → (modulus bits, exponent).
fn rsa_public_key_params(der: &[u8]) -> Option<(usize, u64)> {
    let (0x30, seq, []) = der_tlv(der)? else {
        return None;
    };
    let (0x02, n, rest) = der_tlv(seq)? else {
        return None;
    };
    let (0x02, e, []) = der_tlv(rest)? else {
        return None;
    };
    if n.first()? & 0x80 != 0 || e.first()? & 0x80 != 0 {
        return None; // negative
    }
    let n: &[u8] = &n[n.iter().position(|&b| b != 0)?..];
    let bits = n.len() * 8 - n[0].leading_zeros() as usize;
    let e: &[u8] = &e[e.iter().position(|&b| b != 0)?..];
    if e.len() > 8 {
        return Some((bits, u64::MAX));
    }
    let e = e.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b));
    Some((bits, e))
}

#[cfg(test)]
mod tests;
