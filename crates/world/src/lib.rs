//! Host-side bindings for the `keel:platform@0.1.0` WIT package in `wit/`.
//!
//! This crate holds the project's one `wasmtime::component::bindgen!`. It
//! generates, for the world `keel:platform/platform-host`:
//!
//! * one `Host` trait and one `add_to_linker` per imported interface
//!   (`bindings::keel::platform::kv::Host`, `...::kv::add_to_linker`, ...), so
//!   the runtime links exactly the interfaces a component was granted;
//! * typed callers of the exported `subscriber` and `scheduled` interfaces
//!   and `cache-loader`
//!   (`bindings::exports::keel::platform::subscriber::GuestIndices`, ...), which
//!   the runtime loads only for components that export them.
//!
//! `wasi:*` is not generated here: the runtime takes it from `wasmtime-wasi`
//! and `wasmtime-wasi-http`.

/// Generated code. Imports are `async` (host calls do I/O on tokio) and
/// `trappable` (every host function returns `wasmtime::Result<_>`; `Err`
/// traps the guest, so it is reserved for host bugs and cancelled requests;
/// expected failures are the WIT `error` inside the `Ok`), except the reads
/// that never wait (a RocksDB or SQLite read, an in-memory CRDT): those are
/// plain functions, which spares each call a boxed future and a poll on the
/// fiber (they are the hottest calls: a guest loop of reads). Exports are
/// `async` so the runtime calls them with `call_async` on async stores.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "keel:platform/platform-host",
        imports: {
            "keel:platform/kv.get": trappable,
            "keel:platform/kv.exists": trappable,
            "keel:platform/kv.list-keys": trappable,
            "keel:platform/sql.query": trappable,
            "keel:platform/sql.prepare": trappable,
            "keel:platform/sql.[method]prepared.columns": trappable,
            "keel:platform/sql.[method]prepared.query": trappable,
            "keel:platform/sql.[drop]prepared": trappable,
            "keel:platform/events.read": trappable,
            "keel:platform/events.last-sequence": trappable,
            "keel:platform/edge-operations.local-node": trappable,
            "keel:platform/edge-operations.get-local-state": trappable,
            "keel:platform/edge-operations.get-user-preferences": trappable,
            "keel:platform/state.counter-value": trappable,
            "keel:platform/state.set-contains": trappable,
            "keel:platform/state.set-members": trappable,
            "keel:platform/state.register-get": trappable,
            "keel:platform/state.map-get": trappable,
            "keel:platform/state.map-keys": trappable,
            "keel:platform/state.map-entries": trappable,
            default: async | trappable,
        },
        exports: { default: async },
        // A guest's prepared statement is the store's own description of it.
        with: { "keel:platform/sql.prepared": keel_store::PreparedSql },
        // Lets tests and adapters compare results (`assert_eq!`); `Eq` is
        // impossible because some records carry `f64`.
        additional_derives: [PartialEq],
    });
}

/// The WIT package every Keel interface belongs to.
pub const KEEL_PACKAGE: &str = "keel:platform";

/// The package version this build implements. Components must import the
/// same major.minor (`0.1.x`); see [`interface_short_name`].
pub const KEEL_VERSION: &str = "0.1.0";

/// Every interface of `keel:platform`, unversioned.
pub const KEEL_INTERFACES: &[&str] = &[
    "keel:platform/types",
    "keel:platform/edge-operations",
    "keel:platform/regional-coordination",
    "keel:platform/global-coordination",
    "keel:platform/state",
    "keel:platform/cache",
    "keel:platform/kv",
    "keel:platform/sql",
    "keel:platform/events",
    "keel:platform/ledger",
    "keel:platform/live",
    "keel:platform/subscriber",
    "keel:platform/scheduled",
    "keel:platform/cache-loader",
];

/// Imported interfaces that are capabilities: each must be granted in
/// `keel.toml` (deny by default).
pub const GRANTABLE_INTERFACES: &[&str] = &[
    "keel:platform/edge-operations",
    "keel:platform/regional-coordination",
    "keel:platform/global-coordination",
    "keel:platform/state",
    "keel:platform/cache",
    "keel:platform/kv",
    "keel:platform/sql",
    "keel:platform/events",
    "keel:platform/ledger",
    "keel:platform/live",
];

/// Imported interfaces that carry only types. A component importing any keel
/// interface also imports these; they grant nothing, need no grant and need
/// no linker definition (wasmtime type-checks type-only instance imports
/// without one).
pub const TYPE_ONLY_INTERFACES: &[&str] = &["keel:platform/types"];

/// Interfaces a component may export for the host to call.
pub const EXPORTED_INTERFACES: &[&str] = &[
    "keel:platform/subscriber",
    "keel:platform/scheduled",
    "keel:platform/cache-loader",
];

/// Maps a keel interface name, as it appears in a component's imports or
/// exports, to its short name: `"keel:platform/kv@0.1.0"` -> `"kv"`.
///
/// Accepts the unversioned form (`"keel:platform/kv"`) and any `0.1.x`
/// version, which is what wasmtime's linker treats as compatible with 0.1.0.
/// Returns `None` for other packages, unknown interfaces and other versions,
/// so a caller can report them instead of linking them.
pub fn interface_short_name(full: &str) -> Option<&str> {
    let (path, version) = match full.split_once('@') {
        Some((path, version)) => (path, Some(version)),
        None => (full, None),
    };
    if let Some(version) = version
        && !is_compatible_version(version)
    {
        return None;
    }
    if !KEEL_INTERFACES.contains(&path) {
        return None;
    }
    path.strip_prefix(KEEL_PACKAGE)?.strip_prefix('/')
}

/// `0.1.x` with a numeric patch (pre-release/build suffixes are not ours).
fn is_compatible_version(version: &str) -> bool {
    let Some(patch) = version.strip_prefix("0.1.") else {
        return false;
    };
    !patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wit_parser::{Resolve, WorldItem};

    fn wit_dir() -> std::path::PathBuf {
        keel_test_support::workspace_root().join("wit")
    }

    fn parse_wit() -> (Resolve, wit_parser::PackageId) {
        let mut resolve = Resolve::default();
        let (package, _sources) = resolve
            .push_dir(wit_dir())
            .expect("wit/ must parse with its deps");
        (resolve, package)
    }

    #[test]
    fn every_listed_interface_exists_in_the_package() {
        let (resolve, package) = parse_wit();
        let pkg = &resolve.packages[package];
        assert_eq!(
            pkg.name.to_string(),
            format!("{KEEL_PACKAGE}@{KEEL_VERSION}")
        );
        for full in KEEL_INTERFACES {
            let short = interface_short_name(full).expect("listed names are keel names");
            assert!(
                pkg.interfaces.contains_key(short),
                "{full} is listed in KEEL_INTERFACES but not defined in wit/"
            );
        }
        // And the other way round: nothing in wit/ is missing from the list.
        for name in pkg.interfaces.keys() {
            let full = format!("{KEEL_PACKAGE}/{name}");
            assert!(
                KEEL_INTERFACES.contains(&full.as_str()),
                "{full} is defined in wit/ but missing from KEEL_INTERFACES"
            );
        }
    }

    #[test]
    fn interface_categories_partition_the_package() {
        let mut categorized: Vec<&str> = GRANTABLE_INTERFACES
            .iter()
            .chain(TYPE_ONLY_INTERFACES)
            .chain(EXPORTED_INTERFACES)
            .copied()
            .collect();
        categorized.sort_unstable();
        let mut all = KEEL_INTERFACES.to_vec();
        all.sort_unstable();
        assert_eq!(categorized, all);

        let (resolve, package) = parse_wit();
        for full in TYPE_ONLY_INTERFACES {
            let short = interface_short_name(full).unwrap();
            let id = resolve.packages[package].interfaces[short];
            assert!(
                resolve.interfaces[id].functions.is_empty(),
                "{full} must stay type-only: it is linked without a grant"
            );
        }
    }

    #[test]
    fn every_world_resolves() {
        let (resolve, package) = parse_wit();
        let worlds = &resolve.packages[package].worlds;
        for name in [
            "platform-imports",
            "platform-host",
            "edge-service",
            "scheduled-job",
            "http-kv",
            "http-sql",
            "http-events",
            "http-state",
            "http-cache",
            "http-cache-loading",
            "http-ledger",
            "http-edge",
            "http-regional",
            "http-global",
            "http-live",
        ] {
            assert!(worlds.contains_key(name), "world {name} missing");
        }
        for name in worlds.keys() {
            let id = resolve
                .select_world(&[package], Some(name))
                .unwrap_or_else(|e| panic!("world {name} does not resolve: {e:#}"));
            // Every import and export must name something that exists.
            let world = &resolve.worlds[id];
            for (key, item) in world.imports.iter().chain(&world.exports) {
                if let WorldItem::Interface { id, .. } = item {
                    assert!(
                        resolve.id_of(*id).is_some(),
                        "world {name}: {} is not a named interface",
                        resolve.name_world_key(key)
                    );
                }
            }
        }
    }

    #[test]
    fn worlds_import_what_they_promise() {
        let (resolve, package) = parse_wit();
        let imports_of = |world: &str| -> Vec<String> {
            let id = resolve.select_world(&[package], Some(world)).unwrap();
            resolve.worlds[id]
                .imports
                .keys()
                .map(|k| resolve.name_world_key(k))
                .collect()
        };
        let exports_of = |world: &str| -> Vec<String> {
            let id = resolve.select_world(&[package], Some(world)).unwrap();
            resolve.worlds[id]
                .exports
                .keys()
                .map(|k| resolve.name_world_key(k))
                .collect()
        };
        let versioned = |name: &str| format!("{name}@{KEEL_VERSION}");

        // The catalogue and the host world import every grantable interface.
        for world in ["platform-imports", "platform-host", "edge-service"] {
            let imports = imports_of(world);
            for full in GRANTABLE_INTERFACES.iter().chain(TYPE_ONLY_INTERFACES) {
                assert!(imports.contains(&versioned(full)), "{world} lacks {full}");
            }
        }
        assert!(exports_of("platform-imports").is_empty());

        // The host world exports every exportable interface and nothing
        // from wasi (wasi bindings come from wasmtime-wasi).
        let mut host_exports = exports_of("platform-host");
        host_exports.sort();
        let mut expected: Vec<String> = EXPORTED_INTERFACES.iter().map(|f| versioned(f)).collect();
        expected.sort();
        assert_eq!(host_exports, expected);
        assert!(
            imports_of("platform-host")
                .iter()
                .all(|i| i.starts_with(KEEL_PACKAGE))
        );

        let http_handler = "wasi:http/incoming-handler@0.2.12".to_string();
        assert!(exports_of("edge-service").contains(&http_handler));
        assert!(exports_of("edge-service").contains(&versioned("keel:platform/subscriber")));

        // A narrow world imports its one capability (plus types and the wasi
        // interfaces the HTTP handler needs), and no other keel capability.
        for (world, capability) in [
            ("http-kv", "keel:platform/kv"),
            ("http-sql", "keel:platform/sql"),
            ("http-events", "keel:platform/events"),
            ("http-state", "keel:platform/state"),
            ("http-cache", "keel:platform/cache"),
            ("http-cache-loading", "keel:platform/cache"),
            ("http-ledger", "keel:platform/ledger"),
            ("http-edge", "keel:platform/edge-operations"),
            ("http-regional", "keel:platform/regional-coordination"),
            ("http-global", "keel:platform/global-coordination"),
            ("http-live", "keel:platform/live"),
        ] {
            let imports = imports_of(world);
            let granted: Vec<&String> = imports
                .iter()
                .filter(|i| GRANTABLE_INTERFACES.iter().any(|g| versioned(g) == **i))
                .collect();
            assert_eq!(granted, vec![&versioned(capability)], "world {world}");
            assert!(exports_of(world).contains(&http_handler), "world {world}");
        }
    }

    /// The WIT (keel and the vendored WASI 0.2 deps alike) must stay within
    /// what wasmtime 48 runs without experimental flags and what per-request
    /// instances can serve: no `stream`, `future`, `error-context` or
    /// `async func` (see wit/README.md).
    #[test]
    fn wit_uses_no_component_model_async() {
        use wit_parser::{Type, TypeDefKind};

        // Every type named or written inline in a signature is a `TypeDef`
        // in the arena, so scanning the arena finds every stream/future;
        // `error-context` is a primitive, so look at the direct children.
        fn direct_children(kind: &TypeDefKind) -> Vec<Type> {
            match kind {
                TypeDefKind::Record(r) => r.fields.iter().map(|f| f.ty).collect(),
                TypeDefKind::Tuple(t) => t.types.clone(),
                TypeDefKind::Variant(v) => v.cases.iter().filter_map(|c| c.ty).collect(),
                TypeDefKind::Option(t) | TypeDefKind::List(t) | TypeDefKind::Type(t) => vec![*t],
                TypeDefKind::Result(r) => r.ok.iter().chain(&r.err).copied().collect(),
                _ => Vec::new(),
            }
        }

        let (resolve, _) = parse_wit();
        for (_, def) in resolve.types.iter() {
            let name = def.name.as_deref().unwrap_or("<anonymous>");
            assert!(
                !matches!(def.kind, TypeDefKind::Stream(_) | TypeDefKind::Future(_)),
                "type {name} is a stream/future"
            );
            assert!(
                !direct_children(&def.kind).contains(&Type::ErrorContext),
                "type {name} uses error-context"
            );
        }
        for (_, iface) in resolve.interfaces.iter() {
            let iface_name = iface.name.as_deref().unwrap_or("<anonymous>");
            for (func_name, func) in &iface.functions {
                assert!(
                    !func.kind.is_async(),
                    "{iface_name}.{func_name} is an async func"
                );
                let signature = func.params.iter().map(|p| p.ty).chain(func.result);
                for ty in signature {
                    assert_ne!(
                        ty,
                        Type::ErrorContext,
                        "{iface_name}.{func_name} uses error-context"
                    );
                }
            }
        }
    }

    #[test]
    fn short_names() {
        assert_eq!(interface_short_name("keel:platform/kv@0.1.0"), Some("kv"));
        assert_eq!(interface_short_name("keel:platform/kv@0.1.7"), Some("kv"));
        assert_eq!(interface_short_name("keel:platform/kv"), Some("kv"));
        assert_eq!(
            interface_short_name("keel:platform/edge-operations@0.1.0"),
            Some("edge-operations")
        );
        assert_eq!(interface_short_name("keel:platform/kv@0.2.0"), None);
        assert_eq!(interface_short_name("keel:platform/kv@1.0.0"), None);
        assert_eq!(interface_short_name("keel:platform/kv@0.1.0-rc1"), None);
        assert_eq!(interface_short_name("keel:platform/kv@"), None);
        assert_eq!(interface_short_name("keel:platform/nope@0.1.0"), None);
        assert_eq!(interface_short_name("wasi:http/types@0.2.12"), None);
        assert_eq!(interface_short_name("keel:platformx/kv@0.1.0"), None);
        assert_eq!(interface_short_name(""), None);
    }
}
