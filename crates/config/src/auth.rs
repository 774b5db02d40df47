//! `[auth]`: how this node verifies bearer tokens (JWTs) for
//! `edge-operations.authenticate-user`.
//!
//! ```toml
//! [auth]
//! issuer = "https://id.example.com"      # optional; when set, `iss` must equal it
//! audience = ["notes-app"]               # optional string or list; `aud` must match one
//! leeway = "30s"                         # clock skew for exp/nbf (default 30s, at most 10m)
//! required-claims = ["sub", "exp"]       # default; must include "sub" and "exp"
//!
//! [[auth.keys]]
//! kid = "k1"                             # optional
//! algorithm = "HS256"
//! secret-env = "NOTES_JWT_SECRET"        # exactly one of secret, secret-env, secret-file
//! # public-key-file = "keys/rs.pem"      # exactly one of public-key, public-key-env, public-key-file
//! ```
//!
//! This module only checks the shape of the section. Environment variables
//! and files are read (and keys parsed) by `keel-auth`, which reports its
//! problems at the [`AuthKey::location`] kept here.

use crate::diagnostic::Source;
use crate::{Diagnostic, Location};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Default allowed clock skew when checking `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Largest accepted `leeway`.
pub const MAX_LEEWAY: Duration = Duration::from_secs(600);
/// Claims every token must carry, whatever `required-claims` says.
pub const ALWAYS_REQUIRED_CLAIMS: &[&str] = &["sub", "exp"];

/// The validated `[auth]` section. The default (no `[auth]`) has no keys:
/// every token is refused as unavailable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// When set, a token's `iss` must equal it.
    pub issuer: Option<String>,
    /// When non-empty, a token's `aud` (string or list) must contain one of these.
    pub audience: Vec<String>,
    /// Clock skew allowed when checking `exp` and `nbf`.
    pub leeway: Duration,
    /// Claims that must be present (not null); always contains "sub" and "exp".
    pub required_claims: Vec<String>,
    /// Verification keys in file order.
    pub keys: Vec<AuthKey>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuer: None,
            audience: Vec::new(),
            leeway: DEFAULT_LEEWAY,
            required_claims: ALWAYS_REQUIRED_CLAIMS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            keys: Vec::new(),
        }
    }
}

/// One `[[auth.keys]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthKey {
    /// Tokens whose header names a `kid` are verified only with the key of
    /// that `kid`; tokens without one use the key configured for their `alg`.
    pub kid: Option<String>,
    pub algorithm: JwtAlgorithm,
    pub source: KeySource,
    /// Dotted key of the source, such as `auth.keys[0].secret-env`, for diagnostics.
    pub key: String,
    /// Where the source value is written, for diagnostics about it
    /// (unset variable, unreadable file, PEM that does not parse).
    pub location: Location,
}

/// Where key material comes from. Nothing is read while parsing the config.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The value itself (`secret` or `public-key`).
    Inline(String),
    /// The name of an environment variable holding it (`*-env`).
    Env(String),
    /// A file holding it (`*-file`), resolved against the config file's directory.
    File(PathBuf),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Inline values may be secrets: never print them.
            KeySource::Inline(v) => write!(f, "Inline(<{} bytes>)", v.len()),
            KeySource::Env(n) => f.debug_tuple("Env").field(n).finish(),
            KeySource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// JWS algorithms a key may be configured for (`none` never is).
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl JwtAlgorithm {
    pub const ALL: [JwtAlgorithm; 12] = [
        JwtAlgorithm::HS256,
        JwtAlgorithm::HS384,
        JwtAlgorithm::HS512,
        JwtAlgorithm::RS256,
        JwtAlgorithm::RS384,
        JwtAlgorithm::RS512,
        JwtAlgorithm::PS256,
        JwtAlgorithm::PS384,
        JwtAlgorithm::PS512,
        JwtAlgorithm::ES256,
        JwtAlgorithm::ES384,
        JwtAlgorithm::EdDSA,
    ];

    /// The JOSE name (`"HS256"`, `"EdDSA"`), as in a token's `alg` header.
    pub fn name(self) -> &'static str {
        match self {
            JwtAlgorithm::HS256 => "HS256",
            JwtAlgorithm::HS384 => "HS384",
            JwtAlgorithm::HS512 => "HS512",
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::RS384 => "RS384",
            JwtAlgorithm::RS512 => "RS512",
            JwtAlgorithm::PS256 => "PS256",
            JwtAlgorithm::PS384 => "PS384",
            JwtAlgorithm::PS512 => "PS512",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::ES384 => "ES384",
            JwtAlgorithm::EdDSA => "EdDSA",
        }
    }

    /// Exact (case-sensitive) JOSE name.
    pub fn from_name(name: &str) -> Option<JwtAlgorithm> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// HMAC (shared secret) rather than a public-key algorithm.
    pub fn is_hmac(self) -> bool {
        matches!(
            self,
            JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512
        )
    }

    fn accepted() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---- raw serde shapes (strict) ----

/// `[auth]` as written (the span locates the table for diagnostics).
#[derive(Deserialize)]
#[serde(transparent)]
pub(crate) struct RawAuth(Spanned<RawAuthTable>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawAuthTable {
    issuer: Option<Spanned<String>>,
    audience: Option<Spanned<OneOrMany>>,
    leeway: Option<Spanned<String>>,
    required_claims: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    keys: Vec<Spanned<RawKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawKey {
    kid: Option<Spanned<String>>,
    algorithm: Spanned<String>,
    secret: Option<Spanned<String>>,
    secret_env: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    public_key: Option<Spanned<String>>,
    public_key_env: Option<Spanned<String>>,
    public_key_file: Option<Spanned<String>>,
}

/// A string or a list of strings.
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ---- validation ----

const SECRET_SOURCES: &str = "secret, secret-env or secret-file";
const PUBLIC_SOURCES: &str = "public-key, public-key-env or public-key-file (PEM)";

pub(crate) fn build(
    src: &Source,
    base: &Path,
    raw: Option<RawAuth>,
    diags: &mut Vec<Diagnostic>,
) -> AuthConfig {
    let mut cfg = AuthConfig::default();
    let Some(RawAuth(raw)) = raw else {
        return cfg;
    };
    let table_span = raw.span();
    let raw = raw.into_inner();

    if let Some(v) = raw.issuer {
        if v.get_ref().trim().is_empty() {
            diags.push(src.at(
                Some(v.span()),
                "auth.issuer",
                "accepted: a non-empty string such as \"https://id.example.com\"".into(),
            ));
        } else {
            cfg.issuer = Some(v.into_inner());
        }
    }

    if let Some(v) = raw.audience {
        let span = v.span();
        let list = v.into_inner().0;
        if list.is_empty() || list.iter().any(|a| a.is_empty()) {
            diags.push(src.at(
                Some(span),
                "auth.audience",
                "accepted: a non-empty string or a non-empty list of non-empty strings, such as \"notes-app\" or [\"notes-app\", \"admin\"]".into(),
            ));
        } else {
            cfg.audience = list;
        }
    }

    if let Some(v) = raw.leeway
        && let Some(d) = crate::duration(src, &v, "auth.leeway", diags)
    {
        if d > MAX_LEEWAY {
            diags.push(src.at(
                Some(v.span()),
                "auth.leeway",
                "accepted: a duration from 0s to 10m, such as \"30s\"".into(),
            ));
        } else {
            cfg.leeway = d;
        }
    }

    if let Some(v) = raw.required_claims {
        let span = v.span();
        let mut claims: Vec<String> = Vec::new();
        let mut ok = true;
        for c in v.into_inner() {
            if c.get_ref().is_empty() {
                diags.push(src.at(
                    Some(c.span()),
                    "auth.required-claims",
                    "claim names are non-empty strings such as \"sub\"".into(),
                ));
                ok = false;
            } else if !claims.contains(c.get_ref()) {
                claims.push(c.into_inner());
            }
        }
        let missing: Vec<&str> = ALWAYS_REQUIRED_CLAIMS
            .iter()
            .copied()
            .filter(|r| !claims.iter().any(|c| c == r))
            .collect();
        if !missing.is_empty() {
            diags.push(src.at(
                Some(span),
                "auth.required-claims",
                format!(
                    "must include {}: the session's user comes from \"sub\" and its expiry from \"exp\"; accepted: a list of claim names containing \"sub\" and \"exp\", such as [\"sub\", \"exp\", \"iat\"]",
                    missing
                        .iter()
                        .map(|m| format!("{m:?}"))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            ));
            ok = false;
        }
        if ok {
            cfg.required_claims = claims;
        }
    }

    if raw.keys.is_empty() {
        diags.push(src.at(
            Some(table_span),
            "auth.keys",
            "no keys: add at least one [[auth.keys]] table with `algorithm` and a key source (or remove [auth])".into(),
        ));
    }

    // Where each accepted key's entry is written, parallel to cfg.keys.
    let mut written: Vec<Location> = Vec::new();
    for (i, entry) in raw.keys.into_iter().enumerate() {
        let entry_location = src.location(Some(entry.span()));
        let kid_location = entry
            .get_ref()
            .kid
            .as_ref()
            .map(|k| src.location(Some(k.span())));
        let Some(k) = build_key(src, base, i, entry.span(), entry.into_inner(), diags) else {
            continue;
        };
        let clash = cfg.keys.iter().position(|p| match (&p.kid, &k.kid) {
            (Some(a), Some(b)) => a == b,
            (None, None) => p.algorithm == k.algorithm,
            _ => false,
        });
        if let Some(j) = clash {
            let prev_line = written[j].line;
            diags.push(match (&k.kid, kid_location) {
                (Some(kid), Some(at)) => Diagnostic::new(
                    at,
                    format!("auth.keys[{i}].kid"),
                    format!(
                        "kid {kid:?} is already used by the key at line {prev_line}; each kid must be unique"
                    ),
                ),
                _ => Diagnostic::new(
                    entry_location,
                    format!("auth.keys[{i}]"),
                    format!(
                        "a key for {} without a kid is already configured (line {prev_line}); tokens without a kid could not choose between them: give each key a distinct `kid`",
                        k.algorithm
                    ),
                ),
            });
            continue;
        }
        written.push(entry_location);
        cfg.keys.push(k);
    }
    cfg
}

fn build_key(
    src: &Source,
    base: &Path,
    index: usize,
    entry_span: std::ops::Range<usize>,
    raw: RawKey,
    diags: &mut Vec<Diagnostic>,
) -> Option<AuthKey> {
    let key = |k: &str| format!("auth.keys[{index}].{k}");
    let before = diags.len();

    let kid = match raw.kid {
        Some(k) if k.get_ref().is_empty() => {
            diags.push(src.at(
                Some(k.span()),
                &key("kid"),
                "accepted: a non-empty string (or leave `kid` out)".into(),
            ));
            None
        }
        Some(k) => Some(k.into_inner()),
        None => None,
    };

    let name = raw.algorithm.get_ref();
    let algorithm = JwtAlgorithm::from_name(name);
    if algorithm.is_none() {
        let why = if name.eq_ignore_ascii_case("none") {
            "\"none\" (unsigned tokens) is never accepted".to_string()
        } else if let Some(a) = JwtAlgorithm::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name))
        {
            format!("{name:?} is not a supported algorithm (names are case-sensitive: {a})")
        } else {
            format!("{name:?} is not a supported algorithm")
        };
        diags.push(src.at(
            Some(raw.algorithm.span()),
            &key("algorithm"),
            format!("{why}; accepted: {}", JwtAlgorithm::accepted()),
        ));
    }

    // (toml key, is a secret source, value)
    let sources: [(&str, bool, Option<Spanned<String>>); 6] = [
        ("secret", true, raw.secret),
        ("secret-env", true, raw.secret_env),
        ("secret-file", true, raw.secret_file),
        ("public-key", false, raw.public_key),
        ("public-key-env", false, raw.public_key_env),
        ("public-key-file", false, raw.public_key_file),
    ];
    let given: Vec<(&str, bool, Spanned<String>)> = sources
        .into_iter()
        .filter_map(|(k, s, v)| v.map(|v| (k, s, v)))
        .collect();
    let accepted = match algorithm {
        Some(a) if a.is_hmac() => {
            format!("{a} uses a shared secret: exactly one of {SECRET_SOURCES}")
        }
        Some(a) => format!("{a} verifies with a public key: exactly one of {PUBLIC_SOURCES}"),
        None => format!(
            "exactly one of {SECRET_SOURCES} (HS256, HS384, HS512) or {PUBLIC_SOURCES} (other algorithms)"
        ),
    };

    // Sources of the wrong kind for the algorithm.
    if let Some(a) = algorithm {
        for (k, is_secret, v) in &given {
            if *is_secret != a.is_hmac() {
                diags.push(src.at(
                    Some(v.span()),
                    &key(k),
                    format!("`{k}` does not fit algorithm {a}; accepted: {accepted}"),
                ));
            }
        }
    }
    let mut source = None;
    match given.as_slice() {
        [] => diags.push(src.at(
            Some(entry_span),
            &format!("auth.keys[{index}]"),
            format!("no key source; accepted: {accepted}"),
        )),
        [(k, _, v)] => {
            let value = v.get_ref();
            let location = src.location(Some(v.span()));
            let problem = match *k {
                "secret" | "public-key" if value.is_empty() => Some("the value is empty"),
                "secret-env" | "public-key-env"
                    if value.is_empty() || value.contains('=') || value.contains('\0') =>
                {
                    Some("not an environment variable name")
                }
                "secret-file" | "public-key-file" if value.is_empty() || value.contains('\0') => {
                    Some("not a file path")
                }
                _ => None,
            };
            if let Some(p) = problem {
                diags.push(src.at(
                    Some(v.span()),
                    &key(k),
                    format!("{p}; accepted: {accepted}"),
                ));
            } else {
                let s = match *k {
                    "secret" | "public-key" => KeySource::Inline(value.clone()),
                    "secret-env" | "public-key-env" => KeySource::Env(value.clone()),
                    _ => KeySource::File(base.join(value)),
                };
                source = Some((s, key(k), location));
            }
        }
        [_, rest @ ..] => {
            let names: Vec<&str> = given.iter().map(|(k, _, _)| *k).collect();
            diags.push(src.at(
                Some(rest[0].2.span()),
                &key(rest[0].0),
                format!(
                    "several key sources ({}); accepted: {accepted}",
                    names.join(", ")
                ),
            ));
        }
    }

    if diags.len() > before {
        return None;
    }
    let (source, key, location) = source?;
    Some(AuthKey {
        kid,
        algorithm: algorithm?,
        source,
        key,
        location,
    })
}

#[cfg(test)]
mod tests;
