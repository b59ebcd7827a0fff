//! The Debian package: `xtask package --prebuilt` (what `cargo xtask package` runs after its
//! build) makes it from the release anycast-ctl; it holds what it should, installs with
//! `dpkg -i`, its units pass `systemd-analyze verify` and their command lines parse, its
//! example configuration passes `anycast-ctl check`, its bash completion completes, and `dpkg -r` then `dpkg --purge`
//! leave nothing of it behind. Needs root (dpkg); refuses to run where anycast-ctl is
//! installed or any of its paths exists, and purges the package whatever happens.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anycast_tests::workspace_bin;
use anyhow::{bail, ensure, Context, Result};

const PACKAGE: &str = "anycast-ctl";
/// The workspace's version, which the package takes.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Files the package must hold (paths as installed). Man pages of further commands may be
/// there too (one per command, generated from the CLI).
const FILES: &[&str] = &[
    "/usr/bin/anycast-ctl",
    "/lib/systemd/system/anycast-agent.service",
    "/lib/systemd/system/anycast-server@.service",
    "/usr/share/doc/anycast-ctl/examples/agent.json.example",
    "/usr/share/doc/anycast-ctl/examples/server.env.example",
    "/usr/share/man/man1/anycast-ctl.1.gz",
    "/usr/share/man/man1/anycast-ctl-agent.1.gz",
    "/usr/share/man/man1/anycast-ctl-server.1.gz",
    "/usr/share/man/man1/anycast-ctl-check.1.gz",
    "/usr/share/man/man1/anycast-ctl-status.1.gz",
    "/usr/share/man/man1/anycast-ctl-reload.1.gz",
    "/usr/share/man/man1/anycast-ctl-completions.1.gz",
    "/usr/share/bash-completion/completions/anycast-ctl",
    "/usr/share/zsh/vendor-completions/_anycast-ctl",
    "/usr/share/fish/vendor_completions.d/anycast-ctl.fish",
    "/usr/share/doc/anycast-ctl/copyright",
];

/// The examples' copies the postinst makes (not conffiles: the prerm takes back the ones
/// still as shipped, so `dpkg -r` leaves nothing the package put there).
const EXAMPLE_COPIES: &[&str] = &[
    "/etc/anycast/agent.json.example",
    "/etc/anycast/server.env.example",
];

/// The links `systemctl enable` makes for the units (WantedBy=multi-user.target).
const ENABLED_LINKS: &[&str] = &[
    "/etc/systemd/system/multi-user.target.wants/anycast-agent.service",
    "/etc/systemd/system/multi-user.target.wants/anycast-server@example.service",
];

fn run(cmd: &mut Command) -> Result<Output> {
    let what = format!("{cmd:?}");
    cmd.output()
        .with_context(|| format!("could not start {what}"))
}

/// Stdout of `cmd`, which must succeed.
fn ok(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = run(cmd)?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// dpkg's status of the package, if it knows it at all.
fn dpkg_status() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .ok()?;
    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !status.is_empty()).then_some(status)
}

fn present(path: &str) -> bool {
    Path::new(path).symlink_metadata().is_ok()
}

/// Purges the package and removes the test's directory, whatever state the test left.
struct Cleanup {
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if dpkg_status().is_some() {
            let purged = Command::new("dpkg").args(["--purge", PACKAGE]).status();
            eprintln!("cleanup: dpkg --purge {PACKAGE}: {purged:?}");
        }
        for link in ENABLED_LINKS {
            let _ = std::fs::remove_file(link);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `systemd-analyze verify UNIT`: must succeed without a word about our units (it warns
/// about unknown keys and bad values on stderr but still exits 0; it fails on a missing
/// binary or man page).
fn verify(unit: &str) -> Result<()> {
    let out = run(Command::new("systemd-analyze").args(["verify", unit]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "systemd-analyze verify {unit} failed ({}): {stderr}",
        out.status
    );
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("anycast")).collect();
    ensure!(
        ours.is_empty(),
        "systemd-analyze verify {unit} warns: {ours:#?}"
    );
    if !stderr.trim().is_empty() {
        eprintln!("systemd-analyze verify {unit}, about other units: {stderr}");
    }
    Ok(())
}

#[test]
fn package_builds_installs_verifies_and_removes_cleanly() -> Result<()> {
    // Never touch an operator's installation or files.
    if let Some(status) = dpkg_status() {
        bail!("{PACKAGE} is known to dpkg here ({status}); this test installs and purges it: run `dpkg --purge {PACKAGE}` first");
    }
    let taken: Vec<&&str> = FILES
        .iter()
        .chain(ENABLED_LINKS)
        .chain(EXAMPLE_COPIES)
        .chain(&["/etc/anycast"])
        .filter(|p| present(p))
        .collect();
    ensure!(
        taken.is_empty(),
        "these paths exist and dpkg -i would replace them: {taken:?}"
    );

    let dir = std::env::temp_dir().join(format!("anycast-package-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Cleanup { dir: dir.clone() };

    // Build.
    let started = std::time::Instant::now();
    let stdout = ok(Command::new(workspace_bin("xtask")?)
        .args(["package", "--prebuilt", "--out"])
        .arg(&dir))?;
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default());
    let arch = ok(Command::new("dpkg").arg("--print-architecture"))?;
    ensure!(
        deb == dir.join(format!("{PACKAGE}_{VERSION}_{}.deb", arch.trim())),
        "unexpected package path {deb:?}"
    );
    eprintln!(
        "built {} ({} KiB) in {:.1} s",
        deb.display(),
        std::fs::metadata(&deb)?.len() / 1024,
        started.elapsed().as_secs_f64()
    );
    let version = ok(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
    ensure!(version.trim() == VERSION, "Version: {version}");

    // Its files: all of FILES, and nothing else but further commands' man pages; all root's.
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    let mut contents = BTreeSet::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        ensure!(fields.len() >= 6, "odd dpkg-deb -c line {line:?}");
        ensure!(fields[1] == "root/root", "not root's: {line}");
        let path = fields[5].trim_start_matches('.');
        if !path.ends_with('/') {
            contents.insert(path.to_string());
            if path == "/usr/bin/anycast-ctl" {
                ensure!(fields[0] == "-rwxr-xr-x", "{line}");
            }
        }
    }
    for f in FILES {
        ensure!(
            contents.contains(*f),
            "{f} is not in the package: {contents:#?}"
        );
    }
    let extra: Vec<&String> = contents
        .iter()
        .filter(|p| !FILES.contains(&p.as_str()))
        .filter(|p| !(p.starts_with("/usr/share/man/man1/anycast-ctl-") && p.ends_with(".1.gz")))
        .collect();
    ensure!(
        extra.is_empty(),
        "unexpected files in the package: {extra:?}"
    );
    ensure!(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles")
            .output()?
            .stdout
            .is_empty(),
        "the package has conffiles: a removal would keep them"
    );

    // Install.
    ok(Command::new("dpkg").arg("-i").arg(&deb))?;
    ensure!(
        dpkg_status().as_deref() == Some("install ok installed"),
        "after dpkg -i: {:?}",
        dpkg_status()
    );
    for f in &contents {
        ensure!(present(f), "{f} missing after dpkg -i");
    }
    for (copy, shipped) in EXAMPLE_COPIES.iter().zip(&FILES[3..5]) {
        ensure!(
            std::fs::read(copy).ok() == std::fs::read(shipped).ok(),
            "{copy}: not a copy of {shipped} after dpkg -i"
        );
    }
    let ctl = "/usr/bin/anycast-ctl";
    let shown = ok(Command::new(ctl).arg("--version"))?;
    ensure!(shown.trim() == format!("anycast-ctl {VERSION}"), "{shown}");
    // The example configuration is valid as shipped (its comments included).
    ok(Command::new(ctl).args(["check", "--config", "/etc/anycast/agent.json.example"]))?;
    // So is the example server command line (clap refuses an unknown option or a bad value
    // before it gets to --help).
    let env = std::fs::read_to_string("/etc/anycast/server.env.example")?;
    let args = env
        .lines()
        .find_map(|l| l.strip_prefix("ANYCAST_SERVER_ARGS="))
        .context("no ANYCAST_SERVER_ARGS= in server.env.example")?;
    let args: Vec<&str> = args.trim_matches('"').split_whitespace().collect();
    ok(Command::new(ctl).arg("server").args(&args).arg("--help"))?;
    // And so are the units' command lines (the server's with the example's arguments).
    for unit in ["anycast-agent.service", "anycast-server@.service"] {
        let text = std::fs::read_to_string(Path::new("/lib/systemd/system").join(unit))?;
        let commands: Vec<&str> = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("ExecStart=")
                    .or(l.strip_prefix("ExecReload="))
            })
            .collect();
        ensure!(!commands.is_empty(), "{unit} has no ExecStart=");
        for command in commands {
            let words: Vec<&str> = command
                .split_whitespace()
                .flat_map(|w| match w {
                    "$ANYCAST_SERVER_ARGS" => args.clone(),
                    w => vec![w],
                })
                .collect();
            ensure!(words[0] == ctl, "{unit}: {command}");
            ok(Command::new(ctl).args(&words[1..]).arg("--help"))
                .with_context(|| format!("{unit}: {command}"))?;
        }
    }

    // The units.
    verify("/lib/systemd/system/anycast-agent.service")?;
    verify("/lib/systemd/system/anycast-server@.service")?;
    verify("anycast-server@example.service")?;
    // The check can fail: a unit with a misspelt key is reported.
    let broken = dir.join("anycast-agent.service");
    let unit = std::fs::read_to_string("/lib/systemd/system/anycast-agent.service")?;
    std::fs::write(&broken, unit.replace("ProtectSystem=", "ProtectSystm="))?;
    ensure!(
        verify(&broken.to_string_lossy()).is_err(),
        "systemd-analyze verify accepted a misspelt key"
    );

    // The man pages are found where the units' Documentation= points.
    let page = ok(Command::new("man").args(["-w", "anycast-ctl-agent"]))?;
    ensure!(
        page.trim() == "/usr/share/man/man1/anycast-ctl-agent.1.gz",
        "man -w: {page}"
    );

    // Bash completion completes commands and options.
    let complete = |line: &str| -> Result<Vec<String>> {
        let words: Vec<&str> = line.split(' ').collect();
        let script = format!(
            "source /usr/share/bash-completion/completions/anycast-ctl\n\
             f=$(complete -p anycast-ctl | sed -E 's/.*-F ([^ ]+).*/\\1/')\n\
             COMP_WORDS=({line}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}\n\
             \"$f\" anycast-ctl '{}' '{}'\n\
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        Ok(ok(Command::new("bash").arg("-c").arg(script))?
            .lines()
            .map(str::to_string)
            .collect())
    };
    let commands = complete("anycast-ctl ag")?;
    ensure!(commands == ["agent"], "anycast-ctl ag<TAB>: {commands:?}");
    let options = complete("anycast-ctl agent --c")?;
    for o in ["--config", "--cleanup"] {
        ensure!(
            options.iter().any(|x| x == o),
            "agent --c<TAB>: {options:?}"
        );
    }

    // Enabled units are disabled by the removal: no link to a missing unit file is left.
    ok(Command::new("systemctl").args([
        "enable",
        "anycast-agent.service",
        "anycast-server@example.service",
    ]))?;
    for link in ENABLED_LINKS {
        ensure!(present(link), "{link} missing after systemctl enable");
    }

    // Remove: everything the package installed goes, the examples' copies and
    // /etc/anycast with them.
    ok(Command::new("dpkg").args(["-r", PACKAGE]))?;
    for f in contents
        .iter()
        .map(String::as_str)
        .chain(EXAMPLE_COPIES.iter().copied())
    {
        ensure!(!present(f), "{f} left after dpkg -r");
    }
    ensure!(!present("/etc/anycast"), "/etc/anycast left after dpkg -r");
    for link in ENABLED_LINKS {
        ensure!(!present(link), "{link} left after dpkg -r");
    }
    ensure!(
        dpkg_status().as_deref() == Some("deinstall ok config-files"),
        "after dpkg -r: {:?}",
        dpkg_status()
    );
    ok(Command::new("dpkg").args(["--purge", PACKAGE]))?;
    for f in &contents {
        ensure!(!present(f), "{f} left after dpkg --purge");
    }

    // An example the operator edited is theirs: a removal keeps it, a purge takes it.
    ok(Command::new("dpkg").arg("-i").arg(&deb))?;
    let edited = EXAMPLE_COPIES[1];
    let mut text = std::fs::read_to_string(edited)?;
    text.push_str("# edited by the operator\n");
    std::fs::write(edited, &text)?;
    ok(Command::new("dpkg").args(["-r", PACKAGE]))?;
    ensure!(
        std::fs::read_to_string(edited).ok().as_deref() == Some(text.as_str()),
        "{edited}: the operator's edit lost by dpkg -r"
    );
    ensure!(!present(EXAMPLE_COPIES[0]), "the unedited example left");
    ok(Command::new("dpkg").args(["--purge", PACKAGE]))?;
    ensure!(
        !present("/etc/anycast"),
        "/etc/anycast left after dpkg --purge"
    );
    ensure!(
        dpkg_status().is_none(),
        "after dpkg --purge: {:?}",
        dpkg_status()
    );
    Ok(())
}
