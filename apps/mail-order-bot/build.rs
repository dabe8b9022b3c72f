//! Rebuilds the binary when the bundled sample mail or the default configuration changes
//! (both are compiled in).
fn main() {
    println!("cargo:rerun-if-changed=samples");
    println!("cargo:rerun-if-changed=../../config/default.toml");
}
