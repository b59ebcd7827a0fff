//! Fixtures as data: each row gives a description, the map setup, the input frame, the
//! expected action, the expected output frame and the counter that must rise by one (every
//! other counter of the program stays, apart from what a program's runner checks itself).
//! One runner, [`run`], plays a table against any of the programs ([`Program`]); a failed
//! row does not stop the others, and the test fails with every failed row listed.
use std::panic::{catch_unwind, AssertUnwindSafe};

use anycast_common::{decap, syn_ack_tunnel, verdict};
use anycast_ctl::dataplane::DesiredService;
use anycast_tests::packet::{first_difference, hex};
use anyhow::{Context as _, Result};

use crate::harness::{action_name, counters, run_xdp, Harness, ServerSide, XDP_PASS};

/// One row of a fixture table.
pub struct Fixture<S> {
    pub description: String,
    /// The map setup for this row, written before the input is run.
    pub setup: S,
    pub input: Vec<u8>,
    /// The program's return code (XDP action, TC action).
    pub action: u32,
    /// The frame after the program; `None` when its bytes are nobody's business (e.g. a
    /// frame dropped half-way through encapsulation).
    pub output: Option<Vec<u8>>,
    /// The counter (index into the program's counter table) that must rise by one.
    pub counted: u32,
}

impl<S> Fixture<S> {
    pub fn new(
        description: impl Into<String>,
        setup: S,
        input: Vec<u8>,
        action: u32,
        counted: u32,
        output: Vec<u8>,
    ) -> Self {
        Fixture {
            description: description.into(),
            setup,
            input,
            action,
            output: Some(output),
            counted,
        }
    }

    /// A row whose output frame is `input`, unchanged.
    pub fn untouched(
        description: impl Into<String>,
        setup: S,
        input: Vec<u8>,
        action: u32,
        counted: u32,
    ) -> Self {
        let output = input.clone();
        Fixture::new(description, setup, input, action, counted, output)
    }
}

/// A program that fixture rows are run against.
pub trait Program {
    /// The map setup of a row.
    type Setup;
    /// Writes the row's setup into the program's maps.
    fn set_up(&mut self, setup: &Self::Setup) -> Result<()>;
    /// Runs the program once: its return code and the frame.
    fn run(&self, input: &[u8]) -> Result<(u32, Vec<u8>)>;
    /// The program's counters, summed over CPUs.
    fn counters(&self) -> Result<Vec<u64>>;
    /// The counters' names, in order.
    fn counter_names(&self) -> &'static [&'static str];
    fn action_name(&self, action: u32) -> String {
        format!("action {action}")
    }
    /// Checks the counter rises of a row: by default, `counted` rose by one and nothing
    /// else moved.
    fn check_counters(&self, f: &Fixture<Self::Setup>, delta: &[u64]) {
        let names = self.counter_names();
        let got: Vec<(&str, u64)> = names.iter().copied().zip(delta.iter().copied()).collect();
        let mut want: Vec<(&str, u64)> = names.iter().map(|n| (*n, 0)).collect();
        want[f.counted as usize].1 = 1;
        assert_eq!(
            got, want,
            "{}: counters that rose (expected {} +1)",
            f.description, names[f.counted as usize]
        );
    }
}

/// Runs every row of `table` against `program`; panics listing the rows that failed.
pub fn run<P: Program>(program: &mut P, table: &[Fixture<P::Setup>]) -> Result<()> {
    let mut failures = Vec::new();
    for f in table {
        program
            .set_up(&f.setup)
            .with_context(|| format!("{}: setting up the maps", f.description))?;
        let before = program.counters()?;
        let (action, out) = program
            .run(&f.input)
            .with_context(|| format!("{}: running the program", f.description))?;
        let after = program.counters()?;
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            assert_eq!(
                program.action_name(action),
                program.action_name(f.action),
                "{}: action",
                f.description
            );
            if let Some(expected) = &f.output {
                assert_eq!(
                    hex(&out),
                    hex(expected),
                    "{}: output frame, left actual, right expected ({})",
                    f.description,
                    first_difference(&out, expected)
                );
            }
            program.check_counters(f, &delta);
        }));
        if let Err(e) = outcome {
            failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| format!("{}: failed", f.description)),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        table.len(),
        failures
            .iter()
            .map(|m| m.lines().next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The programs.

/// The agent (`anycast_agent`) on frames received on fx0; a row's setup is the whole
/// service set (`apply` removes any other); its counters are `VERDICTS`.
impl Program for Harness {
    type Setup = Vec<DesiredService>;

    fn set_up(&mut self, services: &Self::Setup) -> Result<()> {
        self.dataplane.apply(services)
    }
    fn run(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_xdp(&self.dataplane, self.fx0, input)
    }
    fn counters(&self) -> Result<Vec<u64>> {
        counters(&self.dataplane)
    }
    fn counter_names(&self) -> &'static [&'static str] {
        &verdict::NAMES
    }
    fn action_name(&self, action: u32) -> String {
        action_name(action)
    }
    /// The verdict rose by one; of the flow counters, a verdict that comes after a service
    /// was found adds one flow-table lookup (a hit or a miss, as earlier rows left the
    /// table), and no entry ends within a row.
    fn check_counters(&self, f: &Fixture<Self::Setup>, delta: &[u64]) {
        let delta: Vec<(&str, u64)> = verdict::NAMES
            .iter()
            .copied()
            .zip(delta.iter().copied())
            .collect();
        let mut want: Vec<(&str, u64)> = verdict::NAMES.iter().map(|n| (*n, 0)).collect();
        want[f.counted as usize].1 = 1;
        let split = verdict::FLOW_HIT as usize;
        assert_eq!(
            &delta[..split],
            &want[..split],
            "{}: verdict counters that rose (expected {} +1)",
            f.description,
            verdict::NAMES[f.counted as usize]
        );
        let rest = verdict::FLOW_EXPIRED as usize + 1;
        assert_eq!(
            &delta[rest..],
            &want[rest..],
            "{}: verdict counters after the flow counters (expected {} +1)",
            f.description,
            verdict::NAMES[f.counted as usize]
        );
        let lookups = delta[split].1 + delta[split + 1].1;
        assert_eq!(
            lookups,
            u64::from(looks_up_flow(f.counted) && !is_icmp(&f.input)),
            "{}: flow_hit + flow_miss",
            f.description
        );
        assert_eq!(
            delta[verdict::FLOW_EXPIRED as usize],
            ("flow_expired", 0),
            "{}: no flow-table entry ends within a fixture run",
            f.description
        );
    }
}

/// The agent on frames received on another port than fx0 (`.1`, an ifindex); otherwise as
/// [`Harness`].
pub struct OnPort<'a>(pub &'a mut Harness, pub u32);

impl Program for OnPort<'_> {
    type Setup = Vec<DesiredService>;

    fn set_up(&mut self, services: &Self::Setup) -> Result<()> {
        self.0.set_up(services)
    }
    fn run(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_xdp(&self.0.dataplane, self.1, input)
    }
    fn counters(&self) -> Result<Vec<u64>> {
        self.0.counters()
    }
    fn counter_names(&self) -> &'static [&'static str] {
        self.0.counter_names()
    }
    fn action_name(&self, action: u32) -> String {
        action_name(action)
    }
    fn check_counters(&self, f: &Fixture<Self::Setup>, delta: &[u64]) {
        self.0.check_counters(f, delta)
    }
}

/// Verdicts that come after a service was found, and so after a flow-table lookup.
fn looks_up_flow(reason: u32) -> bool {
    !matches!(
        reason,
        verdict::PASS_NOT_SERVICE
            | verdict::PASS_FRAGMENT
            | verdict::PASS_MALFORMED
            | verdict::REVERSE_TUNNEL
            | verdict::PASS_REVERSE_OFF
            | verdict::PASS_REVERSE_STRANGER
            | verdict::PASS_REVERSE_WRONG_IFACE
            // ICMP is no flow's packet: an error reads the quoted flow's entry without
            // counting it, an echo request none.
            | verdict::ICMP_TO_SERVER
            | verdict::PASS_ICMP_MALFORMED
            | verdict::PASS_ICMP_NOT_SERVICE
            | verdict::ECHO_REPLY
    )
}

/// Whether `frame` (Ethernet, perhaps one 802.1Q tag) carries ICMP or ICMPv6: an ICMP error
/// tunnelled to its server reads the quoted flow's entry without counting it, whatever
/// verdict its forwarding ends in.
fn is_icmp(frame: &[u8]) -> bool {
    let l3 = if frame.get(12..14) == Some(&[0x81, 0x00]) {
        18
    } else {
        14
    };
    match frame.get(l3).map(|b| b >> 4) {
        Some(4) => frame.get(l3 + 9) == Some(&1),
        Some(6) => frame.get(l3 + 6) == Some(&58),
        _ => false,
    }
}

/// The server's decapsulation (`anycast_decap`) on frames received on fx0; a row's setup is
/// the anycast addresses the server answers for; its counters are `DECAP_STATS`.
pub struct Decap<'a>(pub &'a mut ServerSide);

impl Program for Decap<'_> {
    type Setup = Vec<&'static str>;

    fn set_up(&mut self, served: &Self::Setup) -> Result<()> {
        self.0.set_served(served)
    }
    fn run(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.0.run_decap(input)
    }
    fn counters(&self) -> Result<Vec<u64>> {
        self.0.decap_counters()
    }
    fn counter_names(&self) -> &'static [&'static str] {
        &decap::NAMES
    }
    fn action_name(&self, action: u32) -> String {
        action_name(action)
    }
}

/// The server's SYN-ACK tunnel (`anycast_reverse`, TC egress); a row's setup is where the
/// tunnel goes, (agent, source); its counters are `REVERSE_STATS`.
pub struct SynAckTunnel<'a>(pub &'a mut ServerSide);

impl Program for SynAckTunnel<'_> {
    type Setup = (&'static str, &'static str);

    fn set_up(&mut self, (agent, source): &Self::Setup) -> Result<()> {
        self.0.set_tunnel(agent, source)
    }
    fn run(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.0.run_tc(input)
    }
    fn counters(&self) -> Result<Vec<u64>> {
        self.0.reverse_counters()
    }
    fn counter_names(&self) -> &'static [&'static str] {
        &syn_ack_tunnel::NAMES
    }
}

// ---------------------------------------------------------------------------------------
// Rows of the agent's tables.

/// A row of an agent table: its setup is the whole service set.
pub type AgentFixture = Fixture<Vec<DesiredService>>;

/// An agent row with an output frame.
pub fn fixture(
    description: impl Into<String>,
    services: Vec<DesiredService>,
    input: Vec<u8>,
    action: u32,
    reason: u32,
    output: Vec<u8>,
) -> AgentFixture {
    Fixture::new(description, services, input, action, reason, output)
}

/// An agent row passed to the kernel untouched.
pub fn untouched(
    description: impl Into<String>,
    services: Vec<DesiredService>,
    input: Vec<u8>,
    reason: u32,
) -> AgentFixture {
    Fixture::untouched(description, services, input, XDP_PASS, reason)
}
