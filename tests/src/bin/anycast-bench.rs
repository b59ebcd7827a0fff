//! `anycast-bench`: the benchmarks of issue 5 (run as root by `cargo xtask bench`).
//!
//! Prints a Markdown table per part and writes the whole report as JSON. Every figure stands
//! beside a baseline measured in the same run: on a shared machine the ratios are what
//! count. All network work happens in namespaces this program creates and deletes (also
//! when a part fails; a namespace left by a killed run is removed by the next run).
//!
//! ```text
//! anycast-bench [--quick] [--json PATH] [--only PARTS]
//!   --quick        a short smoke run (small counts, one run each)
//!   --json PATH    where to write the JSON report (default target/bench.json)
//!   --only PARTS   comma-separated subset of: packet, profile, rate, iperf, scale,
//!                  control, registration, failover, memory
//!   --spin CASE SECS  instead: run only the agent program on one case (hit4, miss4, hit6,
//!                  miss6, 4in6, pass) for SECS seconds on the last CPU, as a steady load
//!                  for an outside profiler (`perf record -e cpu-clock -C CPU`)
//! ```
#[path = "../bench/capture.rs"]
mod capture;
#[path = "../bench/control.rs"]
mod control;
#[path = "../bench/e2e.rs"]
mod e2e;
#[path = "../bench/failover.rs"]
mod failover;
#[path = "../bench/live.rs"]
mod live;
#[path = "../bench/memory.rs"]
mod memory;
#[path = "../bench/packets.rs"]
mod packets;
#[path = "../bench/perpacket.rs"]
mod perpacket;
#[path = "../bench/rate.rs"]
mod rate;
#[path = "../bench/report.rs"]
mod report;

use std::{path::PathBuf, time::Instant};

use anyhow::{bail, Context as _, Result};
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
];

struct Args {
    quick: bool,
    spin: Option<(String, f64)>,
    json: PathBuf,
    only: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        spin: None,
        json: PathBuf::from("target/bench.json"),
        only: PARTS.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--spin" => {
                let case = it.next().context("--spin needs a case")?;
                let secs = it
                    .next()
                    .context("--spin needs seconds")?
                    .parse()
                    .context("--spin: seconds")?;
                args.spin = Some((case, secs));
            }
            "--json" => args.json = it.next().context("--json needs a path")?.into(),
            "--only" => {
                let list = it.next().context("--only needs a list")?;
                args.only = list.split(',').map(|s| s.trim().to_string()).collect();
                for p in &args.only {
                    if !PARTS.contains(&p.as_str()) {
                        bail!("unknown part '{p}': choose from {}", PARTS.join(", "));
                    }
                }
            }
            "-h" | "--help" => {
                println!(
                    "anycast-bench [--quick] [--json PATH] [--only PARTS] | --spin CASE SECS\n  \
                     parts: {}\n  spin cases: hit4, miss4, hit6, miss6, 4in6, pass",
                    PARTS.join(", ")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}' (try --help)"),
        }
    }
    Ok(args)
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

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("anycast-bench: {e:#}");
            std::process::exit(2);
        }
    };
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("anycast-bench: must run as root (it creates network namespaces and loads BPF programs); use `cargo xtask bench`");
        std::process::exit(2);
    }
    if let Some((case, secs)) = args.spin.clone() {
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
        args.only.join(", ")
    );
    let want = |p: &str| args.only.iter().any(|o| o == p);
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
