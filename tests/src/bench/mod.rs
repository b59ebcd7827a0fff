//! The benchmarks behind `anycast-bench` (run as root by `cargo xtask bench`): per-packet
//! cost, forwarding rate, TCP throughput, control plane, failover, map memory, floods at
//! the registration port, the controller's death, restart and upgrade under load, and several
//! agents behind a router (failover, binding relay).
//!
//! Prints a Markdown table per part and writes the whole report as JSON. Every figure stands
//! beside a baseline measured in the same run: on a shared machine the ratios are what
//! count. All network work happens in namespaces this program creates and deletes (also
//! when a part fails; a namespace left by a killed run is removed by the next run).
pub mod agents;
pub mod capture;
pub mod control;
pub mod e2e;
pub mod failover;
pub mod floods;
pub mod live;
pub mod memory;
pub mod packets;
pub mod perpacket;
pub mod rate;
pub mod report;
pub mod restart;

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use report::{Report, Section};
use serde_json::json;

const PARTS: &[&str] = &[
    "packet",
    "profile",
    "rate",
    "iperf",
    "scale",
    "control",
    "registration",
    "failover",
    "memory",
    "floods",
    "restart",
    "agents",
];

/// Order of the sections in the output.
const ORDER: &[&str] = &[
    "per_packet",
    "profile",
    "rate",
    "scale",
    "control",
    "failover",
    "memory",
    "floods",
    "restart",
    "agents",
];

/// The anycast load balancer's benchmarks, as root (`cargo xtask bench`); by default every
/// part, in full.
#[derive(clap::Parser, Debug)]
#[command(name = "anycast-bench")]
pub struct Args {
    /// A short smoke run (small counts, one run each).
    #[arg(long)]
    pub quick: bool,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH", default_value = "target/bench.json")]
    pub json: PathBuf,
    /// Comma-separated subset of: packet, profile, rate, iperf, scale, control,
    /// registration, failover, memory, floods, restart, agents.
    #[arg(long, value_name = "PARTS", value_delimiter = ',', value_parser = part)]
    pub only: Option<Vec<String>>,
    /// Instead: run only the agent program on one case (hit4, miss4, hit6, miss6, 4in6,
    /// pass) for SECS seconds on the last CPU, as a steady load for an outside profiler
    /// (`perf record -e cpu-clock -C CPU`).
    #[arg(long, num_args = 2, value_names = ["CASE", "SECS"])]
    pub spin: Option<Vec<String>>,
}

fn part(s: &str) -> Result<String, String> {
    let p = s.trim();
    if PARTS.contains(&p) {
        Ok(p.to_string())
    } else {
        Err(format!(
            "unknown part '{p}': choose from {}",
            PARTS.join(", ")
        ))
    }
}

impl Args {
    /// The parts to run.
    fn parts(&self) -> Vec<String> {
        match &self.only {
            Some(only) => only.clone(),
            None => PARTS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `--spin CASE SECS`, checked.
    fn spin(&self) -> Result<Option<(String, f64)>> {
        let Some(v) = &self.spin else {
            return Ok(None);
        };
        let secs = v[1].parse().context("--spin: seconds")?;
        Ok(Some((v[0].clone(), secs)))
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    json!({
        "nproc": sh("nproc", &[]),
        "kernel": sh("uname", &["-r"]),
        "cpu_model": model,
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "memory": sh("sh", &["-c", "grep MemTotal /proc/meminfo"]),
        "date": sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "commit": sh("git", &["rev-parse", "--short", "HEAD"]),
    })
}

/// Runs the benchmarks `args` ask for, prints the report and writes its JSON; exits the
/// process with 1 if a part failed, 2 if it cannot start.
pub fn main(args: Args) {
    let spin = match args.spin() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("anycast-bench: {e:#}");
            std::process::exit(2);
        }
    };
    let only = args.parts();
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("anycast-bench: must run as root (it creates network namespaces and loads BPF programs); use `cargo xtask bench`");
        std::process::exit(2);
    }
    if let Some((case, secs)) = spin {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let r = perpacket::namespace("acbpp").and_then(|ns| {
            ns.in_ns(move || {
                perpacket::pin_to_cpu(cpus - 1);
                perpacket::spin(&case, secs)
            })
        });
        match r {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("anycast-bench: {e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    let started = Instant::now();
    let mut report = Report {
        machine: machine(),
        mode: if args.quick { "quick" } else { "full" }.into(),
        ..Default::default()
    };
    eprintln!(
        "anycast-bench: {} run, parts: {}",
        report.mode,
        only.join(", ")
    );
    let want = |p: &str| only.iter().any(|o| o == p);
    let quick = args.quick;
    let mut results: Vec<(&str, Result<Section>)> = Vec::new();

    let effort = if quick {
        perpacket::Effort {
            rounds: 4,
            batch: 200,
            quick,
        }
    } else {
        perpacket::Effort {
            rounds: 40,
            batch: 1000,
            quick,
        }
    };
    let (packet, profile, scale) = (want("packet"), want("profile"), want("scale"));
    if packet || profile || scale {
        let step = Instant::now();
        eprintln!("== per-packet cost, profile, scale (BPF_PROG_TEST_RUN)");
        let out = perpacket::namespace("acbpp").and_then(|ns| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            ns.in_ns(move || {
                perpacket::pin_to_cpu(cpus - 1);
                let mut v: Vec<(&str, Result<Section>)> = Vec::new();
                if packet {
                    v.push(("packet", perpacket::per_packet(effort)));
                }
                if profile {
                    v.push(("profile", perpacket::profile(effort)));
                }
                if scale {
                    let scale_effort = perpacket::Effort {
                        rounds: if quick { 3 } else { 20 },
                        ..effort
                    };
                    v.push(("scale", perpacket::scale(scale_effort)));
                }
                Ok(v)
            })
        });
        match out {
            Ok(v) => results.extend(v),
            Err(e) => results.push(("packet", Err(e))),
        }
        eprintln!("   took {:.1}s", step.elapsed().as_secs_f64());
    }
    if want("rate") {
        let step = Instant::now();
        eprintln!("== forwarding rate (veth, live frames)");
        results.push(("rate", rate::forwarding_rate(quick)));
        eprintln!("   took {:.1}s", step.elapsed().as_secs_f64());
    }
    if want("control") {
        let step = Instant::now();
        eprintln!("== control plane (table rebuild, binding updates)");
        results.push(("control", control::control_plane(quick)));
        eprintln!("   took {:.1}s", step.elapsed().as_secs_f64());
    }
    if want("registration") || want("iperf") {
        let step = Instant::now();
        eprintln!("== end to end: registration to first packet, TCP throughput (iperf3)");
        for (part, r) in e2e::run(quick, want("registration"), want("iperf")) {
            results.push((part, r));
        }
        eprintln!("   took {:.1}s", step.elapsed().as_secs_f64());
    }
    if want("failover") {
        let step = Instant::now();
        eprintln!("== failover");
        results.push(("failover", failover::failover(quick)));
        eprintln!("   took {:.1}s", step.elapsed().as_secs_f64());
    }
    if want("memory") {
        let step = Instant::now();
        eprintln!("== map memory");
        results.push(("memory", memory::memory()));
        eprintln!("   took {:.1}s", step.elapsed().as_secs_f64());
    }
    if want("floods") {
        let step = Instant::now();
        eprintln!("== floods at the registration port");
        results.push(("floods", floods::floods(quick)));
        eprintln!("   took {:.1}s", step.elapsed().as_secs_f64());
    }
    if want("restart") {
        let step = Instant::now();
        eprintln!("== controller death, restart and upgrade under load");
        results.push(("restart", restart::restart(quick)));
        eprintln!("   took {:.1}s", step.elapsed().as_secs_f64());
    }

    if want("agents") {
        let step = Instant::now();
        eprintln!("== several agents behind a router: failover, binding relay");
        results.push(("agents", agents::agents(quick)));
        eprintln!("   took {:.1}s", step.elapsed().as_secs_f64());
    }

    for (part, r) in results {
        match r {
            Ok(s) => merge(&mut report, s),
            Err(e) => {
                eprintln!("anycast-bench: part {part} failed: {e:#}");
                report.errors.push(format!("part {part}: {e:#}"));
            }
        }
    }
    report
        .sections
        .sort_by_key(|s| ORDER.iter().position(|o| *o == s.id).unwrap_or(ORDER.len()));
    let elapsed = started.elapsed().as_secs_f64();
    let m = &report.machine;
    println!("## anycast-bench ({} run)\n", report.mode);
    println!(
        "Machine: {} CPUs ({}), kernel {}, {}; load average at start {}; {} s. Shared with \
         other work: compare ratios, not absolute times.",
        m["nproc"].as_str().unwrap_or("?"),
        m["cpu_model"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["date"].as_str().unwrap_or("?"),
        m["loadavg_at_start"].as_str().unwrap_or("?"),
        elapsed.round()
    );
    println!("{}", report.markdown());
    let json = report.json(elapsed);
    if let Some(dir) = args.json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(
        &args.json,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    ) {
        Ok(()) => eprintln!("anycast-bench: wrote {}", args.json.display()),
        Err(e) => {
            eprintln!("anycast-bench: writing {}: {e}", args.json.display());
            std::process::exit(1);
        }
    }
    if !report.errors.is_empty() {
        std::process::exit(1);
    }
}

/// Adds a part's section to the report (parts 2 and 4 come in pieces).
fn merge(report: &mut Report, s: Section) {
    let target = report.section(&s.id, &s.title);
    if target.method.is_empty() {
        target.method = s.method;
    } else if !s.method.is_empty() {
        target.method = format!("{} {}", target.method, s.method);
    }
    target.rows.extend(s.rows);
    target.notes.extend(s.notes);
    match (&mut target.data, s.data) {
        (serde_json::Value::Object(into), serde_json::Value::Object(from)) => into.extend(from),
        (slot, other) => *slot = other,
    }
}
