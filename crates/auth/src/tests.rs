use super::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use keel_config::KeelConfig;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

/// "Now" for every test that does not use the real clock.
const NOW: u64 = 1_700_000_000;
const HS_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

fn keys_dir() -> PathBuf {
    keel_test_support::workspace_root().join("crates/auth/tests/keys")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(keys_dir().join(name)).unwrap()
}

/// Parses `[auth]` text as a `keel.toml` living in `tests/keys/`, so
/// `public-key-file = "rsa.pub.pem"` finds the fixture.
fn config(toml: &str) -> AuthConfig {
    match KeelConfig::parse(&keys_dir().join("keel.toml"), toml) {
        Ok(c) => c.auth,
        Err(e) => panic!("{e}"),
    }
}

fn authn(toml: &str) -> Authenticator {
    match Authenticator::from_config(&config(toml)) {
        Ok(a) => a,
        Err(e) => panic!("{e}"),
    }
}

fn load_error(toml: &str) -> Diagnostic {
    let e = Authenticator::from_config(&config(toml)).expect_err("keys should be refused");
    assert_eq!(e.0.len(), 1, "{e}");
    e.0[0].clone()
}

fn at(a: &Authenticator, token: &str) -> Result<Session, AuthError> {
    a.authenticate_at(token, UNIX_EPOCH + Duration::from_secs(NOW))
}

fn hs_config() -> String {
    format!(
        "[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"{}\"\n",
        std::str::from_utf8(HS_SECRET).unwrap()
    )
}

const ALL_KEYS: &str = r#"
[auth]
[[auth.keys]]
kid = "rs"
algorithm = "RS256"
public-key-file = "rsa.pub.pem"
[[auth.keys]]
kid = "ps"
algorithm = "PS256"
public-key-file = "rsa.pub.pem"
[[auth.keys]]
kid = "es"
algorithm = "ES256"
public-key-file = "ec256.pub.pem"
[[auth.keys]]
kid = "es384"
algorithm = "ES384"
public-key-file = "ec384.pub.pem"
[[auth.keys]]
kid = "ed"
algorithm = "EdDSA"
public-key-file = "ed25519.pub.pem"
"#;

fn hs_key() -> EncodingKey {
    EncodingKey::from_secret(HS_SECRET)
}
fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read("rsa.pem")).unwrap()
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, key).unwrap()
}

fn claims() -> Value {
    json!({ "sub": "user-1", "exp": NOW + 3600, "iat": NOW - 10 })
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Signs raw header/payload text (for payloads serde cannot produce).
fn sign_raw(header: &str, payload: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

// ---- accepted tokens ----

#[test]
fn valid_hs256() {
    let a = authn(&hs_config());
    let s = at(&a, &sign(Algorithm::HS256, None, &claims(), &hs_key())).unwrap();
    assert_eq!(s.user, "user-1");
    assert_eq!(s.expires_at_ms, (NOW + 3600) * 1000);
    assert_eq!(s.issued_at_ms, (NOW - 10) * 1000);
    assert_eq!(s.session_id, None);
    assert!(s.scopes.is_empty());
    assert!(s.claims.is_empty());
}

#[test]
fn valid_with_the_real_clock() {
    let a = authn(&hs_config());
    let now = jsonwebtoken::get_current_timestamp();
    let t = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "u", "exp": now + 60}),
        &hs_key(),
    );
    assert_eq!(a.authenticate(&t).unwrap().user, "u");
    let t = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "u", "exp": now - 120}),
        &hs_key(),
    );
    assert_eq!(a.authenticate(&t), Err(AuthError::Expired));
}

#[test]
fn valid_asymmetric_tokens() {
    let a = authn(ALL_KEYS);
    let cases = [
        (Algorithm::RS256, "rs", rsa_key()),
        (Algorithm::PS256, "ps", rsa_key()),
        (
            Algorithm::ES256,
            "es",
            EncodingKey::from_ec_pem(&read("ec256.pem")).unwrap(),
        ),
        (
            Algorithm::ES384,
            "es384",
            EncodingKey::from_ec_pem(&read("ec384.pem")).unwrap(),
        ),
        (
            Algorithm::EdDSA,
            "ed",
            EncodingKey::from_ed_pem(&read("ed25519.pem")).unwrap(),
        ),
    ];
    for (alg, kid, key) in cases {
        let s = at(&a, &sign(alg, Some(kid), &claims(), &key));
        assert_eq!(s.map(|s| s.user), Ok("user-1".into()), "{alg:?}");
        // Without a kid the (only) key for the algorithm is used.
        let s = at(&a, &sign(alg, None, &claims(), &key));
        assert_eq!(
            s.map(|s| s.user),
            Ok("user-1".into()),
            "{alg:?} without kid"
        );
    }
}

#[test]
fn scopes_and_claims_are_extracted() {
    let a = authn(&hs_config());
    let t = sign(
        Algorithm::HS256,
        None,
        &json!({
            "sub": "user-1", "exp": NOW + 60, "sid": "s-9", "jti": "j-1",
            "scope": "notes:read  notes:write", "scp": ["notes:read", "admin"],
            "roles": ["editor", 7], "scopes": "extra",
            "email": "a@example.com", "name": "Ada", "iss": "https://id",
            "age": 36, "nested": {"x": "y"}, "aud": ["a"],
        }),
        &hs_key(),
    );
    let s = at(&a, &t).unwrap();
    assert_eq!(s.session_id.as_deref(), Some("s-9"));
    assert_eq!(s.issued_at_ms, 0);
    assert_eq!(
        s.scopes,
        ["notes:read", "notes:write", "admin", "extra", "editor"]
    );
    assert_eq!(
        s.claims,
        [
            ("email".to_string(), "a@example.com".to_string()),
            ("iss".into(), "https://id".into()),
            ("jti".into(), "j-1".into()),
            ("name".into(), "Ada".into()),
            ("scopes".into(), "extra".into()),
        ]
    );

    // jti is the session id when there is no sid.
    let t = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "u", "exp": NOW + 60, "jti": "j-2", "sid": 5}),
        &hs_key(),
    );
    let s = at(&a, &t).unwrap();
    assert_eq!(s.session_id.as_deref(), Some("j-2"));
    assert!(s.claims.is_empty(), "{:?}", s.claims);
}

#[test]
fn fractional_numeric_dates_are_accepted() {
    let a = authn(&hs_config());
    let t = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "u", "exp": (NOW as f64) + 60.5, "iat": NOW as f64 - 0.25}),
        &hs_key(),
    );
    let s = at(&a, &t).unwrap();
    assert_eq!(s.expires_at_ms, NOW * 1000 + 60_500);
    assert_eq!(s.issued_at_ms, NOW * 1000 - 250);
}

// ---- time ----

#[test]
fn expired_and_leeway() {
    let a = authn(&hs_config()); // default leeway 30s
    let t = |exp: u64| {
        sign(
            Algorithm::HS256,
            None,
            &json!({"sub": "u", "exp": exp}),
            &hs_key(),
        )
    };
    assert_eq!(at(&a, &t(NOW - 31)), Err(AuthError::Expired));
    assert_eq!(at(&a, &t(NOW - 30)), Err(AuthError::Expired));
    assert!(at(&a, &t(NOW - 29)).is_ok());

    let strict = authn(&format!(
        "[auth]\nleeway = \"0s\"\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"{}\"\n",
        std::str::from_utf8(HS_SECRET).unwrap()
    ));
    assert_eq!(at(&strict, &t(NOW)), Err(AuthError::Expired));
    assert!(at(&strict, &t(NOW + 1)).is_ok());
}

#[test]
fn not_yet_valid() {
    let a = authn(&hs_config());
    let t = |nbf: u64| {
        sign(
            Algorithm::HS256,
            None,
            &json!({"sub": "u", "exp": NOW + 3600, "nbf": nbf}),
            &hs_key(),
        )
    };
    assert_eq!(at(&a, &t(NOW + 60)), Err(AuthError::NotYetValid));
    assert!(at(&a, &t(NOW + 20)).is_ok(), "within leeway");
    assert!(at(&a, &t(NOW - 20)).is_ok());
}

// ---- claims ----

#[test]
fn issuer_is_checked_when_configured() {
    let a =
        authn(&hs_config().replace("[auth]\n", "[auth]\nissuer = \"https://id.example.com\"\n"));
    let t = |iss: Value| {
        let mut c = claims();
        if !iss.is_null() {
            c["iss"] = iss;
        }
        sign(Algorithm::HS256, None, &c, &hs_key())
    };
    assert!(at(&a, &t(json!("https://id.example.com"))).is_ok());
    for (iss, want) in [
        (json!("https://evil.example.com"), "iss: the token's issuer"),
        (Value::Null, "iss: missing"),
        (json!(["https://id.example.com"]), "iss: must be a string"),
    ] {
        match at(&a, &t(iss.clone())) {
            Err(AuthError::ClaimMismatch(m)) => assert!(m.starts_with(want), "{iss}: {m}"),
            other => panic!("{iss}: {other:?}"),
        }
    }
}

#[test]
fn audience_is_checked_when_configured() {
    let a = authn(&hs_config().replace(
        "[auth]\n",
        "[auth]\naudience = [\"notes-app\", \"admin\"]\n",
    ));
    let t = |aud: Value| {
        let mut c = claims();
        if !aud.is_null() {
            c["aud"] = aud;
        }
        sign(Algorithm::HS256, None, &c, &hs_key())
    };
    assert!(at(&a, &t(json!("notes-app"))).is_ok());
    assert!(at(&a, &t(json!(["other", "admin"]))).is_ok());
    for aud in [
        json!("other"),
        json!(["x", "y"]),
        json!([]),
        Value::Null,
        json!(5),
    ] {
        match at(&a, &t(aud.clone())) {
            Err(AuthError::ClaimMismatch(m)) => assert!(m.starts_with("aud:"), "{aud}: {m}"),
            other => panic!("{aud}: {other:?}"),
        }
    }
    // Not configured: any aud is fine.
    let open = authn(&hs_config());
    let mut c = claims();
    c["aud"] = json!("whatever");
    assert!(at(&open, &sign(Algorithm::HS256, None, &c, &hs_key())).is_ok());
}

#[test]
fn required_claims_and_subject() {
    let a = authn(&hs_config().replace(
        "[auth]\n",
        "[auth]\nrequired-claims = [\"sub\", \"exp\", \"iat\"]\n",
    ));
    let bad = [
        (
            json!({"exp": NOW + 60, "iat": NOW}),
            "sub: required claim is missing",
        ),
        (
            json!({"sub": null, "exp": NOW + 60, "iat": NOW}),
            "sub: required claim is missing",
        ),
        (
            json!({"sub": "", "exp": NOW + 60, "iat": NOW}),
            "sub: must be a non-empty string",
        ),
        (
            json!({"sub": 42, "exp": NOW + 60, "iat": NOW}),
            "sub: must be a non-empty string",
        ),
        (
            json!({"sub": "u", "iat": NOW}),
            "exp: required claim is missing",
        ),
        (
            json!({"sub": "u", "exp": NOW + 60}),
            "iat: required claim is missing",
        ),
        (
            json!({"sub": "u", "exp": "tomorrow", "iat": NOW}),
            "exp: must be a NumericDate",
        ),
        (
            json!({"sub": "u", "exp": -5, "iat": NOW}),
            "exp: must be a NumericDate",
        ),
        (
            json!({"sub": "u", "exp": NOW + 60, "iat": NOW, "nbf": "x"}),
            "nbf: must be a NumericDate",
        ),
        (
            json!({"sub": "u", "exp": NOW + 60, "iat": [1]}),
            "iat: must be a NumericDate",
        ),
    ];
    for (c, want) in bad {
        match at(&a, &sign(Algorithm::HS256, None, &c, &hs_key())) {
            Err(AuthError::ClaimMismatch(m)) => assert!(m.starts_with(want), "{c}: {m}"),
            other => panic!("{c}: {other:?}"),
        }
    }
    // A far-future exp saturates rather than overflowing.
    let s = at(
        &a,
        &sign(
            Algorithm::HS256,
            None,
            &json!({"sub": "u", "exp": u64::MAX, "iat": 1e300}),
            &hs_key(),
        ),
    )
    .unwrap();
    assert_eq!(s.expires_at_ms, u64::MAX);
}

// ---- signatures and keys ----

#[test]
fn tampered_payload_is_a_bad_signature() {
    let a = authn(&hs_config());
    let t = sign(Algorithm::HS256, None, &claims(), &hs_key());
    let parts: Vec<&str> = t.split('.').collect();
    let evil = b64(json!({"sub": "admin", "exp": NOW + 3600})
        .to_string()
        .as_bytes());
    let forged = format!("{}.{}.{}", parts[0], evil, parts[2]);
    assert_eq!(at(&a, &forged), Err(AuthError::BadSignature));

    let a = authn(ALL_KEYS);
    let t = sign(Algorithm::RS256, Some("rs"), &claims(), &rsa_key());
    let parts: Vec<&str> = t.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], evil, parts[2]);
    assert_eq!(at(&a, &forged), Err(AuthError::BadSignature));
}

#[test]
fn signature_by_another_key_is_bad() {
    let a = authn(ALL_KEYS);
    let other = EncodingKey::from_rsa_pem(&read("rsa-other.pem")).unwrap();
    let t = sign(Algorithm::RS256, Some("rs"), &claims(), &other);
    assert_eq!(at(&a, &t), Err(AuthError::BadSignature));

    let hs = authn(&hs_config());
    let t = sign(
        Algorithm::HS256,
        None,
        &claims(),
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
    );
    assert_eq!(at(&hs, &t), Err(AuthError::BadSignature));

    // Empty signature.
    let t = sign(Algorithm::HS256, None, &claims(), &hs_key());
    let unsigned = &t[..t.rfind('.').unwrap() + 1];
    assert_eq!(at(&hs, unsigned), Err(AuthError::BadSignature));
}

#[test]
fn unknown_kid() {
    let a = authn(ALL_KEYS);
    let t = sign(Algorithm::RS256, Some("k9"), &claims(), &rsa_key());
    match at(&a, &t) {
        Err(AuthError::UnknownKey(m)) => assert!(m.contains("\"k9\""), "{m}"),
        other => panic!("{other:?}"),
    }
    // A kid is never matched against a kid-less key.
    let hs = authn(&hs_config());
    let t = sign(Algorithm::HS256, Some("k1"), &claims(), &hs_key());
    assert!(matches!(at(&hs, &t), Err(AuthError::UnknownKey(_))));
}

#[test]
fn no_kid_with_several_keys_for_the_algorithm_is_refused() {
    let a = authn(
        r#"
[auth]
[[auth.keys]]
kid = "a"
algorithm = "RS256"
public-key-file = "rsa.pub.pem"
[[auth.keys]]
kid = "b"
algorithm = "RS256"
public-key-file = "rsa.pub.pem"
"#,
    );
    let t = sign(Algorithm::RS256, None, &claims(), &rsa_key());
    match at(&a, &t) {
        Err(AuthError::UnknownKey(m)) => assert!(m.contains("\"a\", \"b\""), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(
        at(
            &a,
            &sign(Algorithm::RS256, Some("b"), &claims(), &rsa_key())
        )
        .is_ok()
    );
}

#[test]
fn alg_none_is_never_accepted() {
    let a = authn(&hs_config());
    let payload = b64(claims().to_string().as_bytes());
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"None"}"#,
        r#"{"alg":"NONE","kid":"x"}"#,
    ] {
        let t = format!("{}.{payload}.", b64(header.as_bytes()));
        match at(&a, &t) {
            Err(AuthError::UnsupportedAlgorithm(m)) => assert!(m.starts_with("none"), "{m}"),
            other => panic!("{header}: {other:?}"),
        }
    }
}

#[test]
fn algorithm_must_match_the_key() {
    // Only RS256 is configured: an HS256 token is refused before any
    // verification, even one "signed" with the RSA public key as secret.
    let a = authn(
        "[auth]\n[[auth.keys]]\nkid = \"rs\"\nalgorithm = \"RS256\"\npublic-key-file = \"rsa.pub.pem\"\n",
    );
    let confused = EncodingKey::from_secret(&read("rsa.pub.pem"));
    for kid in [None, Some("rs")] {
        let t = sign(Algorithm::HS256, kid, &claims(), &confused);
        match at(&a, &t) {
            Err(AuthError::UnsupportedAlgorithm(m)) => assert!(m.starts_with("HS256"), "{m}"),
            other => panic!("{kid:?}: {other:?}"),
        }
    }
    // Same key family, other algorithm: PS256 token for an RS256 key.
    let t = sign(Algorithm::PS256, Some("rs"), &claims(), &rsa_key());
    assert!(matches!(
        at(&a, &t),
        Err(AuthError::UnsupportedAlgorithm(_))
    ));
    // Unknown algorithm names.
    let payload = b64(claims().to_string().as_bytes());
    let t = format!("{}.{payload}.c2ln", b64(br#"{"alg":"ES512"}"#));
    assert!(
        matches!(at(&a, &t), Err(AuthError::UnsupportedAlgorithm(m)) if m.starts_with("\"ES512\""))
    );
}

#[test]
fn no_keys_is_unavailable() {
    let a = Authenticator::from_config(&AuthConfig::default()).unwrap();
    assert!(!a.is_configured());
    assert_eq!(
        a.authenticate("anything"),
        Err(AuthError::Unavailable(
            "no [auth] keys configured on this node".into()
        ))
    );
    assert!(authn(&hs_config()).is_configured());
}

// ---- malformed input ----

#[test]
fn garbage_is_malformed() {
    let a = authn(&hs_config());
    let good = sign(Algorithm::HS256, None, &claims(), &hs_key());
    let (h, rest) = good.split_once('.').unwrap();
    let (p, s) = rest.split_once('.').unwrap();
    let hs = |header: &str| b64(header.as_bytes());
    let long = "a".repeat(MAX_TOKEN_BYTES + 1);
    let cases: Vec<String> = vec![
        String::new(),
        ".".into(),
        "..".into(),
        "...".into(),
        "a.b".into(),
        "a.b.c.d".into(),
        "a.b.c.d.e".into(),
        "not a token".into(),
        "Bearer abc.def.ghi".into(),
        format!("Bearer {good}"),
        format!("{good} "),
        format!("{h}=.{p}.{s}"),
        format!("{h}.{p}.{s}=="),
        format!("{h}.{p}.{s}!"),
        format!("{}.{p}.{s}", &h[1..]),
        format!("{}.{p}.{s}", hs("[1,2]")),
        format!("{}.{p}.{s}", hs("{\"alg\":5}")),
        format!("{}.{p}.{s}", hs("{\"typ\":\"JWT\"}")),
        format!("{}.{p}.{s}", hs("{\"alg\":\"HS256\",\"kid\":[]}")),
        format!(
            "{}.{p}.{s}",
            hs("{\"alg\":\"HS256\",\"crit\":[\"b64\"],\"b64\":false}")
        ),
        format!("{}.{p}.{s}", hs("{\"alg\":\"HS256\",\"alg\":\"none\"}")),
        format!("{}.{p}.{s}", hs("{\"alg\":\"HS256\"")),
        format!("{}.{p}.{s}", hs("\u{feff}{\"alg\":\"HS256\"}")),
        format!("{}.{p}.{s}", "é".repeat(10)),
        long,
    ];
    for t in &cases {
        match at(&a, t) {
            Err(AuthError::Malformed(_)) => {}
            other => panic!("{:?}: {other:?}", &t[..t.len().min(80)]),
        }
    }

    // Payloads that verify but are not acceptable JSON objects.
    let key = hs_key();
    for payload in [
        "[]",
        "\"sub\"",
        "{\"sub\":\"a\",\"sub\":\"b\",\"exp\":1800000000}",
        "{\"sub\":\"a\",\"exp\":1800000000",
        &format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
        &format!(
            "{{\"sub\":\"u\",\"exp\":1800000000,\"x\":{}{}}}",
            "[".repeat(3000),
            "]".repeat(3000)
        ),
    ] {
        let t = sign_raw("{\"alg\":\"HS256\"}", payload, &key, Algorithm::HS256);
        match at(&a, &t) {
            Err(AuthError::Malformed(_)) => {}
            other => panic!("{:?}: {other:?}", &payload[..payload.len().min(60)]),
        }
    }
    // The raw signer itself makes good tokens.
    let t = sign_raw(
        "{\"alg\":\"HS256\",\"typ\":\"JWT\"}",
        "{\"sub\":\"u\",\"exp\":1800000000}",
        &key,
        Algorithm::HS256,
    );
    assert!(at(&a, &t).is_ok());
}

/// A small deterministic PRNG (xorshift64*), so the "fuzz" tests are repeatable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_input_never_panics_and_never_verifies() {
    let a = authn(&format!(
        "{}\n{}",
        ALL_KEYS,
        "[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"0123456789abcdef0123456789abcdef-test-secret\"\n"
    ));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let alphabet: Vec<char> =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ {}\":,é\u{0}"
            .chars()
            .collect();
    for _ in 0..3000 {
        let len = rng.below(300);
        let t: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        assert!(at(&a, &t).is_err(), "{t:?}");
    }

    // Random header/payload JSON (valid base64url), random signatures.
    let fragments = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"alg\"",
        "\"kid\"",
        "\"HS256\"",
        "\"RS256\"",
        "\"ES256\"",
        "\"EdDSA\"",
        "\"none\"",
        "\"rs\"",
        "\"es\"",
        "\"ed\"",
        "null",
        "1e999",
        "-1",
        "0",
        "18446744073709551616",
        "\"sub\"",
        "\"exp\"",
        "\"\\ud800\"",
        "true",
    ];
    for _ in 0..3000 {
        let mut part = || -> String {
            let n = rng.below(12);
            let s: String = (0..n)
                .map(|_| fragments[rng.below(fragments.len())])
                .collect();
            b64(s.as_bytes())
        };
        let (h, p) = (part(), part());
        let sig_len = [0, 43, 86, 342, 10][rng.below(5)];
        let sig: String = (0..sig_len).map(|_| alphabet[rng.below(64)]).collect();
        let t = format!("{h}.{p}.{sig}");
        assert!(at(&a, &t).is_err(), "{t:?}");
    }

    // Mutations of valid tokens: one changed character never verifies.
    let tokens = [
        sign(Algorithm::HS256, None, &claims(), &hs_key()),
        sign(Algorithm::RS256, Some("rs"), &claims(), &rsa_key()),
        sign(
            Algorithm::ES256,
            Some("es"),
            &claims(),
            &EncodingKey::from_ec_pem(&read("ec256.pem")).unwrap(),
        ),
        sign(
            Algorithm::EdDSA,
            Some("ed"),
            &claims(),
            &EncodingKey::from_ed_pem(&read("ed25519.pem")).unwrap(),
        ),
    ];
    for t in &tokens {
        assert!(at(&a, t).is_ok());
        let bytes = t.as_bytes();
        for _ in 0..300 {
            let i = rng.below(bytes.len());
            let mut c = alphabet[rng.below(alphabet.len())];
            while c.is_ascii() && c as u8 == bytes[i] {
                c = alphabet[rng.below(alphabet.len())];
            }
            let mut m = String::from(&t[..i]);
            m.push(c);
            m.push_str(&t[i + 1..]);
            assert!(at(&a, &m).is_err(), "mutation at {i} verified: {m}");
        }
    }
}

// ---- key loading ----

#[test]
fn keys_from_env_and_file() {
    let secret = std::str::from_utf8(HS_SECRET).unwrap();
    // SAFETY: no other test reads or writes this variable, and nothing in this
    // process reads the environment outside Rust's std (which synchronizes).
    unsafe { std::env::set_var("KEEL_AUTH_TEST_SECRET_8d1f", secret) };
    let dir = std::env::temp_dir().join(format!("keel-auth-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), format!("{secret}\n")).unwrap();
    std::fs::copy(keys_dir().join("ed25519.pub.pem"), dir.join("ed.pem")).unwrap();

    let toml = format!(
        "[auth]\n\
         [[auth.keys]]\nkid = \"env\"\nalgorithm = \"HS256\"\nsecret-env = \"KEEL_AUTH_TEST_SECRET_8d1f\"\n\
         [[auth.keys]]\nkid = \"file\"\nalgorithm = \"HS256\"\nsecret-file = \"secret\"\n\
         [[auth.keys]]\nkid = \"ed\"\nalgorithm = \"EdDSA\"\npublic-key-file = \"{}\"\n",
        dir.join("ed.pem").display()
    );
    let cfg = KeelConfig::parse(&dir.join("keel.toml"), &toml)
        .unwrap()
        .auth;
    let a = Authenticator::from_config(&cfg).unwrap();
    for kid in ["env", "file"] {
        let t = sign(Algorithm::HS256, Some(kid), &claims(), &hs_key());
        assert!(at(&a, &t).is_ok(), "{kid}");
    }
    let ed = EncodingKey::from_ed_pem(&read("ed25519.pem")).unwrap();
    assert!(at(&a, &sign(Algorithm::EdDSA, Some("ed"), &claims(), &ed)).is_ok());

    // Public key PEM from the environment, too.
    let pem = String::from_utf8(read("ec256.pub.pem")).unwrap();
    // SAFETY: as above.
    unsafe { std::env::set_var("KEEL_AUTH_TEST_PEM_8d1f", pem) };
    let a = authn(
        "[auth]\n[[auth.keys]]\nalgorithm = \"ES256\"\npublic-key-env = \"KEEL_AUTH_TEST_PEM_8d1f\"\n",
    );
    let ec = EncodingKey::from_ec_pem(&read("ec256.pem")).unwrap();
    assert!(at(&a, &sign(Algorithm::ES256, None, &claims(), &ec)).is_ok());

    // Unset and empty variables.
    let d = load_error(
        "[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret-env = \"KEEL_AUTH_TEST_UNSET_8d1f\"\n",
    );
    assert_eq!(
        (d.location.line, d.key.as_str()),
        (4, "auth.keys[0].secret-env")
    );
    assert!(
        d.message.contains("KEEL_AUTH_TEST_UNSET_8d1f is not set"),
        "{d}"
    );
    // SAFETY: as above.
    unsafe { std::env::set_var("KEEL_AUTH_TEST_EMPTY_8d1f", "") };
    let d = load_error(
        "[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret-env = \"KEEL_AUTH_TEST_EMPTY_8d1f\"\n",
    );
    assert!(d.message.contains("is empty"), "{d}");
}

#[test]
fn unusable_keys_are_diagnosed_at_their_line() {
    let pk = |alg: &str, file: &str| {
        format!("[auth]\n\n[[auth.keys]]\nalgorithm = \"{alg}\"\npublic-key-file = \"{file}\"\n")
    };
    let cases = [
        (pk("RS256", "missing.pem"), "cannot read"),
        (pk("RS256", "rsa.pem"), "holds a private key"),
        (pk("ES256", "ec256.pem"), "holds a private key"),
        (pk("RS256", "README.md"), "is not PEM"),
        (pk("RS256", "rsa1024.pub.pem"), "1024-bit RSA key"),
        (pk("RS256", "ec256.pub.pem"), "is not an RSA public key"),
        (pk("ES256", "ec384.pub.pem"), "is not a P-256"),
        (pk("ES384", "ec256.pub.pem"), "is not a P-384"),
        (pk("ES256", "rsa.pub.pem"), "is not a P-256"),
        (pk("EdDSA", "ec256.pub.pem"), "is not an Ed25519"),
        (pk("EdDSA", "."), "cannot read"),
        (
            "[auth]\n\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"short\"\n".into(),
            "HS256 secrets must be at least 32 bytes",
        ),
        (
            "[auth]\n\n[[auth.keys]]\nalgorithm = \"HS512\"\nsecret = \"0123456789abcdef0123456789abcdef0123456789abcdef\"\n".into(),
            "HS512 secrets must be at least 64 bytes",
        ),
        (
            "[auth]\n\n[[auth.keys]]\nalgorithm = \"EdDSA\"\npublic-key = \"-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----\\n\"\n".into(),
            "is not an Ed25519",
        ),
    ];
    for (toml, want) in &cases {
        let d = load_error(toml);
        assert_eq!(d.location.line, 5, "{d}");
        assert!(d.key.starts_with("auth.keys[0]."), "{d}");
        assert!(d.message.contains(want), "want {want:?}: {d}");
    }

    // Every bad key is reported at once.
    let e = Authenticator::from_config(&config(
        "[auth]\n[[auth.keys]]\nkid = \"a\"\nalgorithm = \"RS256\"\npublic-key-file = \"nope.pem\"\n\
         [[auth.keys]]\nkid = \"b\"\nalgorithm = \"HS256\"\nsecret = \"x\"\n",
    ))
    .unwrap_err();
    let keys: Vec<_> = e.0.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(
        keys,
        ["auth.keys[0].public-key-file", "auth.keys[1].secret"]
    );
}

#[test]
fn rsa_der_parser_is_total() {
    let mut rng = Rng(7);
    for _ in 0..5000 {
        let len = rng.below(40);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let _ = rsa_public_key_params(&bytes);
        let _ = der_tlv(&bytes);
    }
    assert_eq!(
        rsa_public_key_params(&[0x30, 0x06, 0x02, 0x01, 0x05, 0x02, 0x01, 0x03]),
        Some((3, 3))
    );
    assert_eq!(
        rsa_public_key_params(&[0x30, 0x06, 0x02, 0x01, 0x85, 0x02, 0x01, 0x03]),
        None
    );
    assert_eq!(
        rsa_public_key_params(&[0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x03]),
        None
    );
}

#[test]
fn base64url_is_strict() {
    assert_eq!(b64url_decode(""), Some(vec![]));
    assert_eq!(b64url_decode("QQ"), Some(b"A".to_vec()));
    assert_eq!(b64url_decode("QUI"), Some(b"AB".to_vec()));
    assert_eq!(b64url_decode("QUJD"), Some(b"ABC".to_vec()));
    assert_eq!(b64url_decode("QR"), None, "non-zero trailing bits");
    assert_eq!(b64url_decode("QUJ"), None, "non-zero trailing bits");
    assert_eq!(b64url_decode("Q"), None);
    assert_eq!(b64url_decode("QQ=="), None);
    assert_eq!(b64url_decode("Q+/A"), None);
    assert_eq!(b64url_decode("-_-_"), Some(vec![0xfb, 0xff, 0xbf]));
    for n in 0..20u8 {
        let v: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
        assert_eq!(b64url_decode(&b64(&v)), Some(v));
    }
}

#[test]
fn errors_display_like_wit_variants() {
    assert_eq!(AuthError::Expired.to_string(), "token expired");
    assert_eq!(
        AuthError::ClaimMismatch("iss: x".into()).to_string(),
        "claim mismatch: iss: x"
    );
}
