//! `xtask wit-imports <file.wasm>`: list what a component imports and exports.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use wasmparser::{
    ComponentExternalKind, ComponentTypeRef, Parser, Payload, Validator, WasmFeatures,
};

/// Import and export names of a component (top level only) or a core module.
#[derive(Debug, Default)]
pub struct Interface {
    pub component: bool,
    /// `(name, kind)`, e.g. `("wasi:io/streams@0.2.12", "instance")`, or for a
    /// core module `("wasi:io/streams@0.2.12#[method]output-stream.write",
    /// "func")`.
    pub imports: Vec<(String, &'static str)>,
    pub exports: Vec<(String, &'static str)>,
}

pub fn run(file: &Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let interface = inspect(&bytes).with_context(|| format!("{} is not valid", file.display()))?;
    let what = if interface.component {
        "component"
    } else {
        "core module"
    };
    println!("{} ({what}, {} bytes)", file.display(), bytes.len());
    for (title, items) in [
        ("imports", &interface.imports),
        ("exports", &interface.exports),
    ] {
        println!("{title}:");
        if items.is_empty() {
            println!("  (none)");
        }
        for (name, kind) in items {
            println!("  {name} ({kind})");
        }
    }
    Ok(())
}

/// Validates `bytes` and returns its top-level imports and exports.
pub fn inspect(bytes: &[u8]) -> Result<Interface> {
    Validator::new_with_features(WasmFeatures::all())
        .validate_all(bytes)
        .context("validation failed")?;

    let mut interface = Interface::default();
    // Nested modules and components have their own imports; only depth 0 is
    // what a host has to provide.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload? {
            Payload::Version { encoding, .. } if depth == 0 => {
                interface.component = encoding == wasmparser::Encoding::Component;
            }
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 0 => {
                for import in section {
                    let import = import?;
                    interface
                        .imports
                        .push((import.name.name.to_string(), type_ref_kind(&import.ty)));
                }
            }
            Payload::ComponentExportSection(section) if depth == 0 => {
                for export in section {
                    let export = export?;
                    interface
                        .exports
                        .push((export.name.name.to_string(), extern_kind(export.kind)));
                }
            }
            Payload::ImportSection(section) if depth == 0 => {
                for imports in section {
                    for import in imports? {
                        let (_, import) = import?;
                        let name = format!("{}#{}", import.module, import.name);
                        interface
                            .imports
                            .push((name, core_type_ref_kind(&import.ty)));
                    }
                }
            }
            Payload::ExportSection(section) if depth == 0 => {
                for export in section {
                    let export = export?;
                    let kind = match export.kind {
                        wasmparser::ExternalKind::Func | wasmparser::ExternalKind::FuncExact => {
                            "func"
                        }
                        wasmparser::ExternalKind::Table => "table",
                        wasmparser::ExternalKind::Memory => "memory",
                        wasmparser::ExternalKind::Global => "global",
                        wasmparser::ExternalKind::Tag => "tag",
                    };
                    interface.exports.push((export.name.to_string(), kind));
                }
            }
            _ => {}
        }
    }
    if depth != 0 {
        bail!("unbalanced nesting of modules/components");
    }
    Ok(interface)
}

fn type_ref_kind(ty: &ComponentTypeRef) -> &'static str {
    match ty {
        ComponentTypeRef::Module(_) => "module",
        ComponentTypeRef::Func(_) => "func",
        ComponentTypeRef::Value(_) => "value",
        ComponentTypeRef::Type(_) => "type",
        ComponentTypeRef::Instance(_) => "instance",
        ComponentTypeRef::Component(_) => "component",
    }
}

fn extern_kind(kind: ComponentExternalKind) -> &'static str {
    match kind {
        ComponentExternalKind::Module => "module",
        ComponentExternalKind::Func => "func",
        ComponentExternalKind::Value => "value",
        ComponentExternalKind::Type => "type",
        ComponentExternalKind::Instance => "instance",
        ComponentExternalKind::Component => "component",
    }
}

fn core_type_ref_kind(ty: &wasmparser::TypeRef) -> &'static str {
    match ty {
        wasmparser::TypeRef::Func(_) | wasmparser::TypeRef::FuncExact(_) => "func",
        wasmparser::TypeRef::Table(_) => "table",
        wasmparser::TypeRef::Memory(_) => "memory",
        wasmparser::TypeRef::Global(_) => "global",
        wasmparser::TypeRef::Tag(_) => "tag",
    }
}
