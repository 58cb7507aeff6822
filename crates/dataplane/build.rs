//! Compiles the eBPF programs (C, clang) into OUT_DIR, where
//! `src/lib.rs` embeds them; the same builder runs for
//! `cargo xtask build-ebpf`.

fn main() {
    for source in peermirror_ebpf::sources() {
        println!("cargo:rerun-if-changed={}", source.display());
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    if let Err(e) = peermirror_ebpf::build(&out) {
        // One clear line rather than a wall of output.
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
