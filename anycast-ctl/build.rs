//! Builds the eBPF object (anycast-ebpf) for the bpfel target and puts it in OUT_DIR, where
//! `src/maps.rs` embeds it. The compiler is Debian's rustc-web, linked as the rustup toolchain
//! below by `cargo xtask setup` (the rustup toolchains here lack rust-src, which
//! `-Z build-std=core` needs); RUSTC_BOOTSTRAP=1 lets that stable compiler take `-Z`.
use anyhow::{anyhow, Context as _};

const BPF_TOOLCHAIN: &str = "anycast-bpf";

fn main() -> anyhow::Result<()> {
    let metadata = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("anycast-ctl has no parent directory"))?
        .join("anycast-ebpf");
    let root_dir = metadata.to_str().context("non-UTF-8 path")?;
    // SAFETY (edition 2021: safe): build scripts are single-threaded here.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    let package = aya_build::Package {
        name: "anycast-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(BPF_TOOLCHAIN)).context(
        "building the eBPF program failed; run `cargo xtask setup` to install the toolchain",
    )
}
