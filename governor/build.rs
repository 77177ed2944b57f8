//! Builds the eBPF programs (`governor-ebpf`) for the BPF target with the
//! pinned nightly and bpf-linker, and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`. `cargo xtask setup` installs what this needs.

/// The nightly the eBPF crate builds with. It must use the same LLVM major as
/// bpf-linker (22): a newer nightly emits bitcode bpf-linker can't read
/// ("Invalid record"). Keep in sync with xtask's `PINNED_NIGHTLY`.
const PINNED_NIGHTLY: &str = "nightly-2026-05-20";

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .map(|p| p.join("governor-ebpf"))
        .unwrap_or_default();
    let root = root.to_string_lossy().into_owned();
    let pkg = aya_build::Package {
        name: "governor-ebpf",
        root_dir: &root,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([pkg], aya_build::Toolchain::Custom(PINNED_NIGHTLY)) {
        panic!(
            "building the eBPF programs failed: {e:#}\n\
             hint: run `cargo xtask setup` (as root) to install the pinned nightly \
             ({PINNED_NIGHTLY}) with rust-src and bpf-linker 0.13.0 built against LLVM 22"
        );
    }
}
