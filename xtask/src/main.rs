//! Developer tasks: `cargo xtask setup | build | test | demo | bench | package`.
//!
//! The recipe behind `setup` is /work/shared/TOOLCHAIN.md: Debian's rustc 1.96 (which ships the
//! standard-library source) linked as a rustup toolchain for the eBPF build, and bpf-linker
//! built against LLVM 22. Userspace builds with the default rustup stable toolchain.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod package;

/// Name of the rustup toolchain (linked to /usr) that builds the eBPF object.
/// anycast-ctl/build.rs builds the eBPF programs with the same name.
pub const BPF_TOOLCHAIN: &str = "anycast-bpf";

const DEBIAN_PACKAGES: &str = "rustc-web cargo-web rust-web-src llvm-22-dev libpolly-22-dev \
    zlib1g-dev libzstd-dev iproute2 iperf3 bpftool tcpdump ethtool tshark bird2 \
    systemd man-db prometheus tmux";
const RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";
/// scapy for the wire-format oracle (tests/oracles/*.py), pinned so the oracle does not drift.
const SCAPY_VERSION: &str = "2.6.1";

#[derive(Parser)]
#[command(about = "Build, test and run the anycast load balancer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks (Debian packages, eBPF toolchain, bpf-linker, bpffs).
    Setup,
    /// Set up, then build the whole workspace (the eBPF object is built by anycast-ctl's build.rs);
    /// with --release also anycast-ctl-variant, the test-only build the upgrade test swaps in.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, then run fmt, clippy and the test suite (needs root).
    /// Extra args go to `cargo test`; args after a second `--` go to the test harness.
    Test(Extra),
    /// Set up, build release, then run target/release/anycast-demo with the given args.
    Demo(Extra),
    /// Set up, build release (and anycast-ctl-variant), then run target/release/anycast-bench
    /// with the given args.
    Bench(Extra),
    /// Set up, build anycast-ctl (release), then the Debian package anycast-ctl_VERSION_ARCH.deb
    /// (binary, systemd units, examples in /etc/anycast, man pages, shell completions).
    Package {
        /// Package target/release/anycast-ctl as it is: no setup, no build (the package test).
        #[arg(long)]
        prebuilt: bool,
        /// Where the .deb goes (default: target/debian).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct Extra {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    put_cargo_bin_on_path();
    // The workspace root is the parent of this crate's directory.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    if !matches!(cli.cmd, Cmd::Package { prebuilt: true, .. }) {
        setup()?;
    }
    match cli.cmd {
        Cmd::Setup => Ok(()),
        Cmd::Build { release } => cargo_build(root, release, release),
        Cmd::Test(extra) => test(root, &extra.args),
        Cmd::Demo(extra) => run_binary(root, "anycast-demo", false, &extra.args),
        // The bench's restart part upgrades to the variant.
        Cmd::Bench(extra) => run_binary(root, "anycast-bench", true, &extra.args),
        Cmd::Package { prebuilt, out } => {
            if !prebuilt {
                run(&mut cargo(
                    root,
                    "build --release -p anycast-ctl --bin anycast-ctl",
                ))?;
            }
            let release = target_dir(root).join("release");
            let out = out.unwrap_or_else(|| target_dir(root).join("debian"));
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let deb = package::build(root, &release.join("anycast-ctl"), &out)?;
            // The last line: the package's path (the package test reads it).
            println!("{}", deb.display());
            Ok(())
        }
    }
}

/// rustup's proxies and `cargo install`ed tools live in $CARGO_HOME/bin. Put it first on PATH
/// (if missing) so that `cargo` is rustup's, not Debian's /usr/bin/cargo, and bpf-linker is found.
fn put_cargo_bin_on_path() {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or("/root".into()));
    let cargo_home = std::env::var_os("CARGO_HOME").map_or(home.join(".cargo"), PathBuf::from);
    let bin = cargo_home.join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|p| p == bin) {
        let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
            .expect("PATH entries contain no ':'");
        std::env::set_var("PATH", joined);
    }
}

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text = format!("{text} {}", arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` with inherited stdio; returns its exit status, or an error if it did not start.
fn status(cmd: &mut Command) -> Result<ExitStatus> {
    let what = describe(cmd);
    cmd.status().context(format!("could not start `{what}`"))
}

/// Runs `cmd` with inherited stdio and fails unless it succeeds.
fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Stdout of `cmd` if it starts and succeeds; `None` otherwise (e.g. the program is missing).
fn stdout_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    let ok = out.status.success();
    ok.then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo ARGS` (ARGS split on whitespace) in the workspace root.
fn cargo(root: &Path, args: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args(args.split_whitespace());
    cmd
}

// ---------------------------------------------------------------------------------------------
// setup

fn setup() -> Result<()> {
    check_root()?;
    setup_packages()?;
    setup_toolchain()?;
    setup_bpf_linker()?;
    setup_scapy()?;
    setup_services()?;
    setup_bpffs()
}

fn check_root() -> Result<()> {
    let uid = stdout_of(Command::new("id").arg("-u")).context("could not run `id -u`")?;
    let uid = uid.trim();
    if uid != "0" {
        let why = "it installs packages and mounts bpffs; the tests create network namespaces";
        bail!("cargo xtask must run as root (uid 0, not {uid}): {why}");
    }
    println!("ok: running as root");
    Ok(())
}

fn setup_packages() -> Result<()> {
    let installed = |pkg: &&str| {
        stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
            .is_some_and(|s| s.trim() == "install ok installed")
    };
    let packages = DEBIAN_PACKAGES.split_whitespace();
    let missing: Vec<&str> = packages.filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("ok: Debian packages ({DEBIAN_PACKAGES})");
        return Ok(());
    }
    println!("installing: Debian packages {}", missing.join(" "));
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))
}

fn setup_toolchain() -> Result<()> {
    let list = stdout_of(Command::new("rustup").args(["toolchain", "list"]))
        .context("`rustup toolchain list` failed: is rustup installed and on PATH?")?;
    let is_ours = |l: &str| l.split(' ').next() == Some(BPF_TOOLCHAIN);
    if list.lines().any(is_ours) {
        println!("ok: rustup toolchain {BPF_TOOLCHAIN}");
    } else {
        println!("installing: rustup toolchain {BPF_TOOLCHAIN} -> /usr");
        run(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))?;
    }
    let mut rustc = Command::new("rustup");
    rustc.args(["run", BPF_TOOLCHAIN, "rustc", "--version"]);
    let what = describe(&rustc);
    let version = stdout_of(&mut rustc).with_context(|| format!("`{what}` failed"))?;
    let version = version.trim();
    if !version.contains(" 1.96.") {
        println!("warning: {BPF_TOOLCHAIN} is {version}; the verified version is 1.96");
    }
    if !Path::new(RUST_SRC).is_dir() {
        bail!("{RUST_SRC} is missing: the eBPF build needs it (package rust-web-src)");
    }
    Ok(())
}

fn bpf_linker_ok() -> bool {
    stdout_of(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn setup_bpf_linker() -> Result<()> {
    if bpf_linker_ok() {
        println!("ok: bpf-linker {BPF_LINKER_VERSION}");
        return Ok(());
    }
    println!("installing: bpf-linker {BPF_LINKER_VERSION} (cargo install, about a minute)");
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        // Outside the workspace, so no rust-toolchain or .cargo/config.toml applies.
        cmd.current_dir(std::env::temp_dir())
            .env("RUSTUP_TOOLCHAIN", "stable")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(locked.then_some("--locked"))
            .args(["--no-default-features", "--features", "llvm-22"]);
        run(&mut cmd)
    };
    if let Err(e) = install(true) {
        println!("warning: {e:#}; retrying without --locked");
        install(false)?;
    }
    if !bpf_linker_ok() {
        bail!("bpf-linker on PATH is still not {BPF_LINKER_VERSION}: an older one shadows it?");
    }
    Ok(())
}

fn scapy_ok() -> bool {
    let probe = "import scapy; print(scapy.VERSION)";
    stdout_of(Command::new("python3").args(["-c", probe]))
        .is_some_and(|v| v.trim() == SCAPY_VERSION)
}

/// The independent oracle of the binding wire format (tests/oracles/build_bu.py) uses scapy.
fn setup_scapy() -> Result<()> {
    if scapy_ok() {
        println!("ok: scapy {SCAPY_VERSION}");
        return Ok(());
    }
    println!("installing: scapy {SCAPY_VERSION} (python3 -m pip)");
    if stdout_of(Command::new("python3").args(["-m", "pip", "--version"])).is_none() {
        // Debian's python3 comes without pip.
        println!("installing: Debian package python3-pip");
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends", "python3-pip"]))?;
    }
    let pin = format!("scapy=={SCAPY_VERSION}");
    let install = |extra: Option<&str>| {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "install", "--disable-pip-version-check", &pin])
            .args(extra);
        run(&mut cmd)
    };
    if let Err(e) = install(None) {
        // Debian's own python3 refuses pip installs outside a venv (PEP 668).
        println!("warning: {e:#}; retrying with --break-system-packages");
        install(Some("--break-system-packages"))?;
    }
    if !scapy_ok() {
        bail!("python3 still does not import scapy {SCAPY_VERSION} after installing it");
    }
    Ok(())
}

/// The routing tests run their own `bird` in namespaces they create. Debian's `bird2`
/// starts and enables a system-wide `bird.service` on install, and `prometheus` (installed for
/// its `promtool`, which checks the metrics tests' scrapes) a `prometheus.service`: both are
/// stopped and disabled here, so no daemon of theirs runs outside the tests.
fn setup_services() -> Result<()> {
    for (unit, why) in [
        ("bird.service", "the tests run their own bird"),
        ("prometheus.service", "only promtool is used"),
    ] {
        let active = Command::new("systemctl")
            .args(["is-active", "--quiet", unit])
            .status()
            .is_ok_and(|s| s.success());
        let enabled = Command::new("systemctl")
            .args(["is-enabled", "--quiet", unit])
            .status()
            .is_ok_and(|s| s.success());
        if !active && !enabled {
            println!("ok: {unit} neither running nor enabled");
            continue;
        }
        println!("stopping and disabling: {unit} ({why})");
        // Without systemd as init (a container), `--now` cannot stop anything; disabling works.
        run(Command::new("systemctl").args(["disable", "--now", unit]))
            .or_else(|_| run(Command::new("systemctl").args(["disable", unit])))?;
    }
    Ok(())
}

fn setup_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    // A /proc/mounts line is "SOURCE MOUNTPOINT FSTYPE OPTIONS 0 0".
    let is_bpffs = |l: &str| l.split(' ').skip(1).take(2).eq([BPFFS, "bpf"]);
    if mounts.lines().any(is_bpffs) {
        println!("ok: bpffs at {BPFFS}");
        return Ok(());
    }
    println!("installing: bpffs at {BPFFS}");
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

// ---------------------------------------------------------------------------------------------
// build, test, demo, bench

/// Builds the workspace, and anycast-ctl-variant (a release build only) if `variant`.
fn cargo_build(root: &Path, release: bool, variant: bool) -> Result<()> {
    let mut cmd = cargo(root, "build --workspace");
    cmd.args(release.then_some("--release"));
    run(&mut cmd)?;
    if release && variant {
        run(&mut variant_build(root))?;
    }
    Ok(())
}

/// anycast-ctl-variant: anycast-ctl with the test-only feature that changes the agent
/// program's instructions, for the upgrade test and the bench. Only anycast-ctl itself and
/// its eBPF object are built again; the dependencies are the release build's.
fn variant_build(root: &Path) -> Command {
    cargo(
        root,
        "build --release -p anycast-ctl --features upgrade-variant --bin anycast-ctl-variant",
    )
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    // `cargo xtask test -- FILTER -- --nocapture`: the first part goes to cargo, the part after
    // a second `--` to the test harness, after our own --test-threads=1.
    let (cargo_args, harness_args) = match extra.iter().position(|a| a == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[][..]),
    };
    let mut tests = cargo(root, "test --workspace --release");
    tests.args(cargo_args).arg("--").arg("--test-threads=1");
    tests.args(harness_args);
    let clippy = cargo(root, "clippy --workspace --all-targets -- -D warnings");
    let tiers = [
        ("1 (cargo fmt)", cargo(root, "fmt --all -- --check")),
        ("2 (cargo clippy)", clippy),
        // The network tests run the workspace's binaries (anycast-ctl, anycast-testsrv);
        // `cargo test` alone builds only the binaries of packages that have integration tests.
        (
            "3 (cargo build)",
            cargo(root, "build --workspace --release"),
        ),
        (
            "3b (cargo build: the upgrade test's variant)",
            variant_build(root),
        ),
        ("4 (cargo test: unit, BPF_PROG_TEST_RUN, netns)", tests),
    ];
    for (tier, mut cmd) in tiers {
        println!("==> test tier {tier}: {}", describe(&cmd));
        let started = std::time::Instant::now();
        run(&mut cmd).with_context(|| format!("test tier {tier} failed"))?;
        println!(
            "==> test tier {tier} took {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    println!("==> all test tiers passed");
    Ok(())
}

fn run_binary(root: &Path, name: &str, variant: bool, args: &[String]) -> Result<()> {
    cargo_build(root, true, variant)?;
    let bin = target_dir(root).join("release").join(name);
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }
    let mut cmd = Command::new(&bin);
    cmd.current_dir(root).args(args);
    let status = status(&mut cmd)?;
    if !status.success() {
        eprintln!("`{}` failed ({status})", describe(&cmd));
    }
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    std::process::exit(code)
}

/// Cargo's target directory ($CARGO_TARGET_DIR, relative to the workspace, or target/).
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}
