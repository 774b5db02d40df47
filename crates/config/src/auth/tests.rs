use crate::{AuthConfig, Diagnostics, JwtAlgorithm, KeelConfig, KeySource};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn parse(text: &str) -> Result<KeelConfig, Diagnostics> {
    KeelConfig::parse(Path::new("/etc/keel/keel.toml"), text)
}

fn auth(text: &str) -> AuthConfig {
    match parse(text) {
        Ok(c) => c.auth,
        Err(e) => panic!("{e}"),
    }
}

/// The one diagnostic of `text`, as `(line, key, message)`.
fn one_error(text: &str) -> (usize, String, String) {
    let e = parse(text).expect_err("config should be refused");
    assert_eq!(e.0.len(), 1, "{e}");
    let d = &e.0[0];
    (d.location.line, d.key.clone(), d.message.clone())
}

#[test]
fn no_auth_section_means_no_keys() {
    let a = auth("");
    assert!(a.keys.is_empty());
    assert_eq!(a.leeway, Duration::from_secs(30));
    assert_eq!(a.required_claims, ["sub", "exp"]);
    assert_eq!(a.issuer, None);
    assert!(a.audience.is_empty());
}

#[test]
fn full_section_is_accepted() {
    let a = auth(
        r#"
[auth]
issuer = "https://id.example.com"
audience = ["notes-app", "admin"]
leeway = "45s"
required-claims = ["sub", "exp", "iat"]

[[auth.keys]]
kid = "k1"
algorithm = "HS256"
secret-env = "NOTES_JWT_SECRET"

[[auth.keys]]
kid = "k2"
algorithm = "RS256"
public-key-file = "keys/rs.pem"

[[auth.keys]]
algorithm = "EdDSA"
public-key = """
-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA
-----END PUBLIC KEY-----
"""

[[auth.keys]]
algorithm = "HS512"
secret = "s3cr3t"

[[auth.keys]]
algorithm = "ES256"
secret-file = "/abs/never-read"
"#
        .replace(
            "secret-file = \"/abs/never-read\"",
            "public-key-file = \"/abs/ec.pem\"",
        )
        .as_str(),
    );
    assert_eq!(a.issuer.as_deref(), Some("https://id.example.com"));
    assert_eq!(a.audience, ["notes-app", "admin"]);
    assert_eq!(a.leeway, Duration::from_secs(45));
    assert_eq!(a.required_claims, ["sub", "exp", "iat"]);
    assert_eq!(a.keys.len(), 5);

    let k = &a.keys[0];
    assert_eq!(k.kid.as_deref(), Some("k1"));
    assert_eq!(k.algorithm, JwtAlgorithm::HS256);
    assert_eq!(k.source, KeySource::Env("NOTES_JWT_SECRET".into()));
    assert_eq!(k.key, "auth.keys[0].secret-env");
    assert_eq!((k.location.line, k.location.column), (11, 14));

    // Relative paths resolve against the config file's directory.
    assert_eq!(
        a.keys[1].source,
        KeySource::File(PathBuf::from("/etc/keel/keys/rs.pem"))
    );
    assert_eq!(a.keys[1].key, "auth.keys[1].public-key-file");
    assert!(
        matches!(&a.keys[2].source, KeySource::Inline(p) if p.starts_with("-----BEGIN PUBLIC KEY-----"))
    );
    assert_eq!(a.keys[2].kid, None);
    assert_eq!(a.keys[3].source, KeySource::Inline("s3cr3t".into()));
    assert_eq!(
        a.keys[4].source,
        KeySource::File(PathBuf::from("/abs/ec.pem"))
    );
}

#[test]
fn audience_may_be_a_single_string() {
    let a = auth(
        "[auth]\naudience = \"notes-app\"\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"x\"\n",
    );
    assert_eq!(a.audience, ["notes-app"]);
}

#[test]
fn inline_secrets_are_not_printed_by_debug() {
    let a = auth("[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"hunter2-hunter2\"\n");
    let dbg = format!("{a:?}");
    assert!(!dbg.contains("hunter2"), "{dbg}");
    assert!(dbg.contains("Inline(<15 bytes>)"), "{dbg}");
}

#[test]
fn unknown_keys_are_refused() {
    let (line, key, msg) = one_error("[auth]\nissuer = \"i\"\naudiences = [\"a\"]\n");
    assert_eq!((line, key.as_str()), (3, "audiences"));
    assert!(msg.contains("unknown field"), "{msg}");

    let (line, key, msg) =
        one_error("[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecrt = \"x\"\n");
    assert_eq!((line, key.as_str()), (4, "secrt"));
    assert!(msg.contains("unknown field"), "{msg}");
}

#[test]
fn unknown_algorithm_lists_accepted_ones() {
    let (line, key, msg) =
        one_error("[auth]\n[[auth.keys]]\nalgorithm = \"HS257\"\nsecret = \"x\"\n");
    assert_eq!((line, key.as_str()), (3, "auth.keys[0].algorithm"));
    assert!(
        msg.contains("\"HS257\" is not a supported algorithm"),
        "{msg}"
    );
    assert!(
        msg.contains("accepted: HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"),
        "{msg}"
    );

    let (_, _, msg) = one_error("[auth]\n[[auth.keys]]\nalgorithm = \"none\"\nsecret = \"x\"\n");
    assert!(msg.contains("never accepted"), "{msg}");

    let (_, _, msg) =
        one_error("[auth]\n[[auth.keys]]\nalgorithm = \"rs256\"\npublic-key = \"x\"\n");
    assert!(msg.contains("case-sensitive: RS256"), "{msg}");
}

#[test]
fn source_kind_must_fit_the_algorithm() {
    let (line, key, msg) =
        one_error("[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\npublic-key-file = \"k.pem\"\n");
    assert_eq!((line, key.as_str()), (4, "auth.keys[0].public-key-file"));
    assert!(msg.contains("HS256 uses a shared secret"), "{msg}");
    assert!(msg.contains("secret, secret-env or secret-file"), "{msg}");

    let (line, key, msg) =
        one_error("[auth]\n[[auth.keys]]\nalgorithm = \"ES256\"\nsecret-env = \"S\"\n");
    assert_eq!((line, key.as_str()), (4, "auth.keys[0].secret-env"));
    assert!(msg.contains("ES256 verifies with a public key"), "{msg}");
}

#[test]
fn exactly_one_source() {
    let (line, key, msg) = one_error("[auth]\n[[auth.keys]]\nkid = \"a\"\nalgorithm = \"RS256\"\n");
    assert_eq!((line, key.as_str()), (2, "auth.keys[0]"));
    assert!(msg.contains("no key source"), "{msg}");

    let (line, key, msg) = one_error(
        "[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"x\"\nsecret-env = \"S\"\n",
    );
    assert_eq!((line, key.as_str()), (5, "auth.keys[0].secret-env"));
    assert!(
        msg.contains("several key sources (secret, secret-env)"),
        "{msg}"
    );
}

#[test]
fn empty_values_are_refused() {
    for (src, k) in [
        ("secret = \"\"", "secret"),
        ("secret-env = \"\"", "secret-env"),
        ("secret-env = \"A=B\"", "secret-env"),
        ("secret-file = \"\"", "secret-file"),
    ] {
        let (line, key, _) = one_error(&format!(
            "[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\n{src}\n"
        ));
        assert_eq!((line, key), (4, format!("auth.keys[0].{k}")));
    }
    let (line, key, _) =
        one_error("[auth]\n[[auth.keys]]\nkid = \"\"\nalgorithm = \"HS256\"\nsecret = \"x\"\n");
    assert_eq!((line, key.as_str()), (3, "auth.keys[0].kid"));
    let (_, key, _) =
        one_error("[auth]\nissuer = \"\"\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"x\"\n");
    assert_eq!(key, "auth.issuer");
    let (_, key, _) =
        one_error("[auth]\naudience = []\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"x\"\n");
    assert_eq!(key, "auth.audience");
}

#[test]
fn duplicate_kid_is_refused() {
    let (line, key, msg) = one_error(
        "[auth]\n[[auth.keys]]\nkid = \"k\"\nalgorithm = \"HS256\"\nsecret = \"x\"\n\
         [[auth.keys]]\nkid = \"k\"\nalgorithm = \"RS256\"\npublic-key = \"p\"\n",
    );
    assert_eq!((line, key.as_str()), (7, "auth.keys[1].kid"));
    assert!(msg.contains("kid \"k\" is already used"), "{msg}");
}

#[test]
fn two_keys_without_kid_for_one_algorithm_are_ambiguous() {
    let (line, key, msg) = one_error(
        "[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"x\"\n\
         [[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"y\"\n",
    );
    assert_eq!((line, key.as_str()), (5, "auth.keys[1]"));
    assert!(msg.contains("without a kid is already configured"), "{msg}");

    // Different algorithms, or a kid on one of them, are fine.
    let a = auth(
        "[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"x\"\n\
         [[auth.keys]]\nalgorithm = \"HS384\"\nsecret = \"y\"\n\
         [[auth.keys]]\nkid = \"b\"\nalgorithm = \"HS256\"\nsecret = \"z\"\n",
    );
    assert_eq!(a.keys.len(), 3);
}

#[test]
fn leeway_and_required_claims_are_checked() {
    let base = "[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"x\"\n";
    let (line, key, msg) = one_error(&format!("[auth]\nleeway = \"11m\"\n{base}"));
    assert_eq!((line, key.as_str()), (2, "auth.leeway"));
    assert!(msg.contains("0s to 10m"), "{msg}");
    let (_, key, msg) = one_error(&format!("[auth]\nleeway = \"30\"\n{base}"));
    assert_eq!(key, "auth.leeway");
    assert!(msg.contains("not a duration"), "{msg}");
    assert_eq!(
        auth(&format!("[auth]\nleeway = \"0s\"\n{base}")).leeway,
        Duration::ZERO
    );

    let (line, key, msg) = one_error(&format!("[auth]\nrequired-claims = [\"sub\"]\n{base}"));
    assert_eq!((line, key.as_str()), (2, "auth.required-claims"));
    assert!(msg.contains("must include \"exp\""), "{msg}");
}

#[test]
fn auth_without_keys_is_refused() {
    let (line, key, msg) = one_error("[auth]\nissuer = \"https://id\"\n");
    assert_eq!((line, key.as_str()), (1, "auth.keys"));
    assert!(msg.contains("[[auth.keys]]"), "{msg}");
}

#[test]
fn every_key_error_is_reported() {
    let e = parse(
        "[auth]\n[[auth.keys]]\nalgorithm = \"XX\"\nsecret = \"x\"\n\
         [[auth.keys]]\nalgorithm = \"RS256\"\nsecret = \"y\"\n",
    )
    .unwrap_err();
    let keys: Vec<_> = e.0.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(
        keys,
        ["auth.keys[0].algorithm", "auth.keys[1].secret"],
        "{e}"
    );
}

#[test]
fn algorithm_names_round_trip() {
    for a in JwtAlgorithm::ALL {
        assert_eq!(JwtAlgorithm::from_name(a.name()), Some(a));
        assert_eq!(a.to_string(), a.name());
    }
    assert_eq!(JwtAlgorithm::from_name("none"), None);
    assert!(JwtAlgorithm::HS384.is_hmac());
    assert!(!JwtAlgorithm::EdDSA.is_hmac());
}
