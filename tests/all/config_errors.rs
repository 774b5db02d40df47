use crate::support::*;

/// Both `keel check` and `keel up` refuse, exit 2, and print `file:line`.
fn refused(node: &Node) -> String {
    let (code, _out, err) = node.check();
    assert_eq!(code, 2, "keel check: {err}");
    let (up_code, up_err) = node.up_fails();
    assert_eq!(up_code, 2, "keel up: {up_err}");
    assert!(
        up_err.contains(&err.trim().to_string()),
        "check: {err}\nup: {up_err}"
    );
    err
}

#[test]
fn ungranted_import_is_refused_with_the_line_to_add() {
    let node = Node::raw(&component("uses-kv", "uses-kv", "/...", ""));
    let err = refused(&node);
    let path = node.config().display().to_string();
    assert_eq!(
        err.trim(),
        format!(
            "error: {path}:1:13: components.uses-kv.grants: component \"uses-kv\" imports keel:platform/kv@0.1.0, which is not granted; add `grants = [\"kv\"]` under [components.uses-kv]"
        )
    );
}

#[test]
fn unknown_grant_lists_the_accepted_ones() {
    let node = Node::raw(&component("hello", "hello", "/...", "grants = [\"kvv\"]"));
    let err = refused(&node);
    let path = node.config().display().to_string();
    assert!(err.starts_with(&format!("error: {path}:4:")), "{err}");
    assert!(err.contains("unknown grant \"kvv\"; accepted: "), "{err}");
    assert!(err.contains("kv, "), "{err}");
}

#[test]
fn unknown_key_is_refused_with_its_line() {
    let node = Node::raw(&format!(
        "{}memroy = \"1MiB\"\n",
        component("hello", "hello", "/...", "")
    ));
    let err = refused(&node);
    let path = node.config().display().to_string();
    assert!(
        err.starts_with(&format!(
            "error: {path}:5:1: memroy: unknown field `memroy`"
        )),
        "{err}"
    );
}

#[test]
fn wrong_type_is_refused_with_its_line() {
    let node = Node::raw(&format!(
        "[server]\nworkers = \"many\"\n{}",
        component("hello", "hello", "/...", "")
    ));
    let err = refused(&node);
    let path = node.config().display().to_string();
    assert!(err.starts_with(&format!("error: {path}:2:")), "{err}");
    assert!(err.contains("invalid type"), "{err}");
}

#[test]
fn missing_wasm_file_is_refused() {
    let node = Node::raw("[components.ghost]\nroute = \"/\"\nwasm = \"ghost.wasm\"\n");
    let err = refused(&node);
    let path = node.config().display().to_string();
    assert!(
        err.starts_with(&format!("error: {path}:3:8: components.ghost.wasm: file ")),
        "{err}"
    );
    assert!(err.contains("ghost.wasm not found"), "{err}");
}

#[test]
fn invalid_wasm_is_refused() {
    let node = Node::raw("[components.junk]\nroute = \"/\"\nwasm = \"junk.wasm\"\n");
    write(node.dir.path(), "junk.wasm", b"this is not wasm");
    let err = refused(&node);
    let path = node.config().display().to_string();
    assert!(
        err.starts_with(&format!("error: {path}:3:8: components.junk.wasm: ")),
        "{err}"
    );
    assert!(err.contains("is not a WebAssembly component"), "{err}");

    // A truncated component: right header, broken body.
    let hello = std::fs::read(guest("hello")).unwrap();
    write(node.dir.path(), "junk.wasm", &hello[..hello.len() / 2]);
    let err = refused(&node);
    assert!(err.contains("invalid component"), "{err}");
}

#[test]
fn check_accepts_a_good_config() {
    let node = Node::raw(&component("hello", "hello", "/...", ""));
    let (code, out, err) = node.check();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: hello: /... ->"), "{out}");
}
