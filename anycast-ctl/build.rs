//! Builds the eBPF object (anycast-ebpf) for the BPF target and puts it in OUT_DIR, where
//! `src/dataplane/loader.rs` embeds it. The compiler is Debian's rustc-web, linked as the
//! rustup toolchain below by `cargo xtask setup` (the rustup toolchains here lack rust-src,
//! which `-Z build-std=core` needs); RUSTC_BOOTSTRAP=1 lets that stable compiler take `-Z`.
//!
//! The nested build is what aya-build 0.2.0 runs (same command, flags and target
//! directory), done here so that only what deserves attention reaches the outer cargo as
//! `cargo:warning`: the eBPF crates' compiler warnings and errors and cargo's own warnings,
//! not a line per crate compiled. When the nested build fails, all of its output is shown.
//!
//! anycast-ctl's test-only feature `upgrade-variant` builds anycast-ebpf with its feature of
//! the same name (for the anycast-ctl-variant binary). A feature, not an environment
//! variable: cargo keeps each feature set's build apart in the same target directory.
use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _, Result};

const BPF_TOOLCHAIN: &str = "anycast-bpf";
const PACKAGE: &str = "anycast-ebpf";

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("anycast-ctl has no parent directory"))?
        .join(PACKAGE);
    // The build-dependency on anycast-ebpf rebuilds us when its library changes; its
    // programs (binaries) need this.
    println!("cargo:rerun-if-changed={}", root.display());
    let variant = std::env::var_os("CARGO_FEATURE_UPGRADE_VARIANT").is_some();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").context("no target endianness")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        e => bail!("unsupported endianness {e}"),
    };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("no target architecture")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64".to_string()
    } else {
        arch
    };
    let target_dir = out_dir.join("aya-build").join("target").join(PACKAGE);

    let mut cmd = Command::new("rustup");
    cmd.args(["run", BPF_TOOLCHAIN, "cargo", "build", "--package", PACKAGE])
        .args([
            "--bins",
            "--message-format=json",
            "--release",
            "--target",
            target,
        ])
        .args(
            variant
                .then_some(["--features", "upgrade-variant"])
                .into_iter()
                .flatten(),
        )
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&root)
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut flags = OsString::new();
    for (i, flag) in [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            flags.push("\x1f");
        }
        flags.push(flag);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags);

    let mut child = cmd
        .spawn()
        .context("starting the eBPF build; run `cargo xtask setup` to install the toolchain")?;
    let mut stderr = child.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut programs = Vec::new();
    let mut rendered = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.context("reading the eBPF build's output")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            rendered.push(line);
            continue;
        };
        match message["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(name), Some(exe)) = (
                    message["target"]["name"].as_str(),
                    message["executable"].as_str(),
                ) {
                    programs.push((name.to_string(), PathBuf::from(exe)));
                }
            }
            Some("compiler-message") => {
                if let Some(text) = message["message"]["rendered"].as_str() {
                    rendered.push(text.to_string());
                }
            }
            _ => {}
        }
    }
    let status = child.wait().context("waiting for the eBPF build")?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        for line in stderr
            .lines()
            .chain(rendered.iter().flat_map(|r| r.lines()))
        {
            println!("cargo:warning={line}");
        }
        bail!("building the eBPF programs failed ({status}); run `cargo xtask setup` to install the toolchain");
    }
    // Compiler diagnostics in full; of cargo's own lines, only its warnings and errors.
    for text in &rendered {
        for line in text.lines() {
            println!("cargo:warning={line}");
        }
    }
    for line in stderr.lines() {
        let line = line.trim_start();
        if line.starts_with("warning") || line.starts_with("error") {
            println!("cargo:warning={line}");
        }
    }
    for (name, program) in programs {
        let to = out_dir.join(&name);
        std::fs::copy(&program, &to)
            .with_context(|| format!("copying {} to {}", program.display(), to.display()))?;
    }
    Ok(())
}
