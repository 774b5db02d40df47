//! `bindgen!` reads `wit/` at compile time, but cargo does not know: rebuild
//! this crate whenever a WIT file changes (CI reuses target dirs).
fn main() {
    println!("cargo:rerun-if-changed=../../wit");
}
