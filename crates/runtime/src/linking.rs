//! Deny-by-default linking: which imports a component may have, and the
//! linker that provides them.

use crate::state::HostState;
use keel_config::{ComponentConfig, Diagnostic};
use wasmtime::Engine;
use wasmtime::component::Linker;

/// `keel:platform` interfaces (short names) with a host implementation in
/// this build. A granted interface outside this list makes the component
/// fail to load rather than be linked with fake answers.
pub const IMPLEMENTED_INTERFACES: &[&str] = &[
    "cache",
    "edge-operations",
    "events",
    "global-coordination",
    "kv",
    "ledger",
    "live",
    "regional-coordination",
    "sql",
    "state",
];

/// WASI 0.2 packages every component may import. They are linked with an
/// empty capability context: no preopens, no env, no args, no sockets,
/// stdout/stderr discarded, outgoing HTTP refused unless the component has
/// `allowed-outbound-hosts`.
const WASI_PACKAGES: &[&str] = &[
    "wasi:io",
    "wasi:clocks",
    "wasi:random",
    "wasi:cli",
    "wasi:filesystem",
    "wasi:sockets",
    "wasi:http",
];

const KEEL_PACKAGE: &str = "keel:platform";

/// What is wrong with one import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportProblem {
    NotGranted { import: String, grant: String },
    NotAvailable { import: String, grant: String },
    UnsupportedWasiVersion { import: String },
    Unknown { import: String },
}

/// Short names that may appear in `grants`.
pub fn grantable() -> impl Iterator<Item = &'static str> {
    keel_world::GRANTABLE_INTERFACES
        .iter()
        .filter_map(|full| full.strip_prefix("keel:platform/"))
}

/// `keel:platform` interfaces that carry only types: they grant nothing.
fn is_type_only(pkg: &str, iface: &str) -> bool {
    keel_world::TYPE_ONLY_INTERFACES
        .iter()
        .any(|t| t.strip_prefix("keel:platform/") == Some(iface) && pkg == KEEL_PACKAGE)
}

fn split(import: &str) -> (&str, &str, Option<&str>) {
    let (path, version) = match import.split_once('@') {
        Some((p, v)) => (p, Some(v)),
        None => (import, None),
    };
    match path.split_once('/') {
        Some((pkg, iface)) => (pkg, iface, version),
        None => (path, "", version),
    }
}

pub fn classify(c: &ComponentConfig, import: &str) -> Option<ImportProblem> {
    let (pkg, iface, version) = split(import);
    if WASI_PACKAGES.contains(&pkg) {
        return match version {
            Some(v) if v.starts_with("0.2.") => None,
            _ => Some(ImportProblem::UnsupportedWasiVersion {
                import: import.to_string(),
            }),
        };
    }
    if pkg == KEEL_PACKAGE && keel_world::interface_short_name(import).is_some() {
        if is_type_only(pkg, iface) {
            return None;
        }
        if grantable().any(|g| g == iface) {
            let grant = iface.to_string();
            if !c.grants.iter().any(|g| g.name == iface) {
                return Some(ImportProblem::NotGranted {
                    import: import.to_string(),
                    grant,
                });
            }
            if !IMPLEMENTED_INTERFACES.contains(&iface) {
                return Some(ImportProblem::NotAvailable {
                    import: import.to_string(),
                    grant,
                });
            }
            return None;
        }
    }
    Some(ImportProblem::Unknown {
        import: import.to_string(),
    })
}

/// One diagnostic per problematic import, pointing at the component's table.
pub fn check_imports(c: &ComponentConfig, imports: &[String]) -> Vec<Diagnostic> {
    let key = format!("components.{}.grants", c.name);
    imports
        .iter()
        .filter_map(|i| classify(c, i))
        .map(|p| {
            let message = match p {
                ImportProblem::NotGranted { import, grant } => {
                    let mut grants: Vec<&str> = c.grants.iter().map(|g| g.name.as_str()).collect();
                    grants.push(&grant);
                    format!(
                        "component {:?} imports {import}, which is not granted; add `grants = [{}]` under [components.{}]",
                        c.name,
                        grants
                            .iter()
                            .map(|g| format!("{g:?}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        c.name
                    )
                }
                ImportProblem::NotAvailable { import, grant } => format!(
                    "component {:?} imports {import} (granted as {grant:?}), which is not available in this build; available: {}",
                    c.name,
                    if IMPLEMENTED_INTERFACES.is_empty() {
                        "WASI 0.2 only".to_string()
                    } else {
                        IMPLEMENTED_INTERFACES.join(", ")
                    }
                ),
                ImportProblem::UnsupportedWasiVersion { import } => format!(
                    "component {:?} imports {import}; Keel provides WASI 0.2.x (up to 0.2.12), rebuild the component for WASI 0.2",
                    c.name
                ),
                ImportProblem::Unknown { import } => format!(
                    "component {:?} imports {import}, which Keel does not provide; Keel provides wasi:* 0.2 and keel:platform/* interfaces",
                    c.name
                ),
            };
            Diagnostic::new(c.location.clone(), key.clone(), message)
        })
        .collect()
}

/// Grants must name `keel:platform` interfaces.
pub fn check_grants(c: &ComponentConfig) -> Vec<Diagnostic> {
    c.grants
        .iter()
        .filter(|g| !grantable().any(|n| n == g.name))
        .map(|g| {
            Diagnostic::new(
                g.location.clone(),
                format!("components.{}.grants", c.name),
                format!(
                    "unknown grant {:?}; accepted: {}",
                    g.name,
                    grantable().collect::<Vec<_>>().join(", ")
                ),
            )
        })
        .collect()
}

/// The linker for one component: WASI 0.2 (empty context) plus the
/// `keel:platform` interfaces it was granted.
pub fn linker_for(engine: &Engine, c: &ComponentConfig) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    for grant in &c.grants {
        if IMPLEMENTED_INTERFACES.contains(&grant.name.as_str()) {
            crate::host::add_to_linker(&mut linker, &grant.name)?;
        }
    }
    Ok(linker)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_config::{Grant, Limits, Location, Route};

    fn component(grants: &[&str]) -> ComponentConfig {
        let at = Location {
            file: "keel.toml".into(),
            line: 1,
            column: 1,
        };
        ComponentConfig {
            name: "c".into(),
            wasm: "c.wasm".into(),
            route: Route::parse("/...").unwrap(),
            grants: grants
                .iter()
                .map(|g| Grant {
                    name: g.to_string(),
                    location: at.clone(),
                })
                .collect(),
            allowed_outbound_hosts: vec![],
            limits: Limits::default(),
            personal_data: Default::default(),
            env: vec![],
            live_channels: vec![],
            location: at.clone(),
            wasm_location: at,
        }
    }

    #[test]
    fn wasi_02_at_any_patch_version_is_accepted() {
        let c = component(&[]);
        for i in [
            "wasi:cli/environment@0.2.0",
            "wasi:sockets/tcp@0.2.9",
            "wasi:http/types@0.2.12",
            "wasi:filesystem/preopens@0.2.3",
        ] {
            assert_eq!(classify(&c, i), None, "{i}");
        }
        assert_eq!(
            classify(&c, "wasi:http/types@0.3.0"),
            Some(ImportProblem::UnsupportedWasiVersion {
                import: "wasi:http/types@0.3.0".into()
            })
        );
    }

    #[test]
    fn keel_interfaces_need_a_grant_and_an_implementation() {
        let kv = "keel:platform/kv@0.1.0";
        assert_eq!(
            classify(&component(&[]), kv),
            Some(ImportProblem::NotGranted {
                import: kv.into(),
                grant: "kv".into()
            })
        );
        assert_eq!(classify(&component(&["kv"]), kv), None);
        let ledger = "keel:platform/ledger@0.1.0";
        assert_eq!(classify(&component(&["ledger"]), ledger), None);
        // Type-only interfaces grant nothing and need no grant.
        assert_eq!(classify(&component(&[]), "keel:platform/types@0.1.0"), None);
    }

    #[test]
    fn unknown_packages_versions_and_export_only_interfaces_are_refused() {
        let c = component(&["kv"]);
        for i in [
            "acme:db/query@1.0.0",
            "keel:platform/kv@0.2.0",
            "keel:platform/subscriber@0.1.0",
            "keel:platform/nope@0.1.0",
        ] {
            assert!(
                matches!(classify(&c, i), Some(ImportProblem::Unknown { .. })),
                "{i}"
            );
        }
    }

    #[test]
    fn unknown_grants_are_reported_where_they_are_written() {
        let d = check_grants(&component(&["kv", "kvv"]));
        assert_eq!(d.len(), 1);
        assert!(
            d[0].message
                .starts_with("unknown grant \"kvv\"; accepted: ")
        );
        assert!(d[0].message.contains("edge-operations"));
    }
}
