//! The parts of `anycast-ctl agent`'s documentation that clap's options do not carry
//! (signals, files, running under systemd), written once: as the end of `agent --help` and
//! as sections of the man page anycast-ctl-agent(1), which `anycast-ctl man-pages DIR`
//! writes with the other commands' pages (clap_mangen, from the same clap definitions); and
//! the shell completion scripts (clap_complete).
use std::{io::Write as _, path::Path};

use clap_mangen::{roff::Roff, Man};

/// A section: its heading and its entries, each a tag (none: a paragraph) and a text.
type Section = (&'static str, &'static [(&'static str, &'static str)]);

const AGENT_SECTIONS: &[Section] = &[
    (
        "SIGNALS",
        &[
            (
                "SIGHUP",
                "Re-read the configuration file (as `anycast-ctl reload`). A refused reload \
                 changes nothing.",
            ),
            (
                "SIGTERM, SIGINT",
                "Full stop: detach the data path, remove the pinned maps and links and the \
                 state files (but the bindings file, the replay state), restore the sysctls.",
            ),
            (
                "SIGUSR2",
                "Hand off (restart or upgrade): exit and leave the data path forwarding with \
                 its pinned maps; the next agent of the same instance adopts them, with no gap \
                 in forwarding.",
            ),
        ],
    ),
    (
        "FILES",
        &[
            ("/run/anycast/agent.sock", "The control socket (--socket)."),
            (
                "/run/anycast/INSTANCE/",
                "State files (the configuration's state_directory): maps.json, bindings.json, \
                 sysctl-originals.json, lock. INSTANCE is the configuration's instance, or is \
                 made from the control socket's path (run_anycast_agent_sock).",
            ),
            (
                "/sys/fs/bpf/anycast/INSTANCE/",
                "Pinned maps and XDP links (the configuration's pin_directory).",
            ),
            (
                "/etc/anycast/agent.json",
                "The configuration anycast-agent.service runs with (JSON with // comments; \
                 /etc/anycast/agent.json.example explains each field).",
            ),
        ],
    ),
    (
        "SYSTEMD",
        &[
            (
                "",
                "anycast-agent.service runs `anycast-ctl agent --config /etc/anycast/agent.json \
                 --socket /run/anycast/agent.sock`, with its state in /var/lib/anycast (the \
                 example configuration's state_directory).",
            ),
            (
                "systemctl reload anycast-agent",
                "Re-reads the configuration.",
            ),
            (
                "systemctl stop anycast-agent",
                "Full stop (SIGTERM). `systemctl restart` is a full stop and a fresh start: \
                 open connections are chosen again.",
            ),
            (
                "systemctl kill -s SIGUSR2 --kill-whom=main anycast-agent",
                "Restarts the controller without interrupting forwarding: the agent hands off, \
                 systemd starts the next one (Restart=always), which adopts the pinned state. \
                 Upgrading the package does this to a running agent.",
            ),
        ],
    ),
];

/// The end of `anycast-ctl agent --help`.
pub fn agent_help() -> String {
    let mut text = String::new();
    for (heading, entries) in AGENT_SECTIONS {
        text.push_str(heading);
        text.push_str(":\n");
        for (tag, body) in entries.iter() {
            if !tag.is_empty() {
                text.push_str(&format!("  {tag}\n"));
            }
            text.push_str(&wrap(body, "      ", 92));
        }
        text.push('\n');
    }
    text.trim_end().to_string()
}

/// `body` wrapped at `width` columns, each line indented.
fn wrap(body: &str, indent: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in body.split_whitespace() {
        if !line.is_empty() && indent.len() + line.len() + 1 + word.len() > width {
            out.push_str(&format!("{indent}{line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!("{indent}{line}\n"));
    }
    out
}

/// Writes anycast-ctl.1 and one page per (visible) command into `dir`; the agent's page
/// gets its signals, files and systemd use as man sections instead of a block of text.
pub fn write_pages(cli: clap::Command, dir: &Path) -> std::io::Result<()> {
    clap_mangen::generate_to(cli.clone(), dir)?;
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    let Some(agent) = cli.find_subcommand("agent").cloned() else {
        return Ok(());
    };
    let man = Man::new(agent);
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    let mut roff = Roff::new();
    for (heading, entries) in AGENT_SECTIONS {
        roff.control("SH", [*heading]);
        for (tag, body) in entries.iter() {
            if tag.is_empty() {
                roff.control("PP", []);
            } else {
                roff.control("TP", []);
                roff.text([clap_mangen::roff::bold(*tag)]);
            }
            roff.text([clap_mangen::roff::roman(*body)]);
        }
    }
    roff.to_writer(&mut page)?;
    let path = dir.join(man.get_filename());
    std::fs::File::create(&path)?.write_all(&page)
}

/// The completion script for `shell`. clap_complete's bash script names each command's case
/// from the binary's name in two ways when that name has a hyphen (`anycast__ctl__subcmd__agent`
/// where the command is found, `anycast__subcmd__ctl__subcmd__agent` where its options are
/// listed), so no command's options would complete: the second spelling is made the first.
pub fn completions(shell: clap_complete::Shell, mut cli: clap::Command) -> String {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cli, "anycast-ctl", &mut script);
    let script = String::from_utf8_lossy(&script).into_owned();
    match shell {
        clap_complete::Shell::Bash => script.replace("anycast__subcmd__ctl", "anycast__ctl"),
        _ => script,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn help_lines_fit_and_name_every_signal() {
        let help = super::agent_help();
        assert!(help.lines().all(|l| l.len() <= 92), "{help}");
        for s in [
            "SIGHUP",
            "SIGTERM",
            "SIGUSR2",
            "/sys/fs/bpf/anycast/INSTANCE/",
        ] {
            assert!(help.contains(s), "{s} missing from {help}");
        }
    }

    #[test]
    fn every_bash_command_found_has_its_options_case() {
        let cli = clap::Command::new("anycast-ctl")
            .subcommand(clap::Command::new("agent").arg(clap::Arg::new("config").long("config")))
            .subcommand(clap::Command::new("man-pages"));
        let script = super::completions(clap_complete::Shell::Bash, cli);
        let found: Vec<&str> = script
            .lines()
            .filter_map(|l| l.trim().strip_prefix("cmd=\""))
            .map(|l| l.trim_end_matches('"'))
            .filter(|c| !c.is_empty())
            .collect();
        assert!(found.contains(&"anycast__ctl__subcmd__agent"), "{found:?}");
        for cmd in found {
            assert!(
                script.lines().any(|l| l.trim() == format!("{cmd})")),
                "no case for {cmd} in {script}"
            );
        }
    }
}
