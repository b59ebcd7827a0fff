//! The data path outlives its controller: the agent's maps and XDP links are pinned in bpffs,
//! and a new controller (after a crash, a restart or with another build) adopts them.
//!
//! - Maps: each of [`maps::AGENT_PINNED`] is pinned by name; a build reuses a pinned map only
//!   when its kernel definition (type, key size, value size, entries) is the one this build's
//!   object asks for and the recorded layout version is its own ([`check_layout`]); otherwise
//!   it refuses, saying what to do, and touches nothing.
//! - Links: one bpf_link per interface, pinned, so the program stays attached when the
//!   process dies. A new controller loads its program and swaps it into the pinned link
//!   (`bpf_link_update`): one atomic replacement, no packet sees no program.
use std::path::{Path, PathBuf};

use aya::{
    maps::MapInfo,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};

use super::*;

/// What a pinned map's definition must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Definition {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// Entries of the maps sized at load time.
fn sized_entries(name: &str, sizes: Sizes) -> Option<u32> {
    match name {
        n if n == maps::RINGS => sizes.ring_entries(),
        n if n == maps::FLOWS => Some(sizes.max_flows),
        n if n == maps::SERVICES || n == maps::SERVICE_STATS || n == maps::SERVICE_ADDRS => {
            Some(sizes.max_services)
        }
        _ => None,
    }
}

/// What each pinned map must be, from this build's object and the configured sizes.
fn definitions(sizes: Sizes) -> Result<Vec<(&'static str, Definition)>> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the eBPF object")?;
    maps::AGENT_PINNED
        .iter()
        .map(|&name| {
            let m = object
                .maps
                .get(name)
                .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
            Ok((
                name,
                Definition {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: sized_entries(name, sizes).unwrap_or(m.max_entries()),
                },
            ))
        })
        .collect()
}

/// Refuses pinned maps this build cannot use as they are: another layout version, or a
/// kernel definition other than the one this build's object and configuration ask for.
/// `recorded_version` is the layout version recorded beside them (`None`: no record).
pub fn check_layout(sizes: Sizes, maps_dir: &Path, recorded_version: Option<u32>) -> Result<()> {
    let remedy = "stop it with `anycast-ctl agent --cleanup --config FILE` (forwarding stops \
                  until this agent starts; open connections are re-chosen), or run the build \
                  and configuration that made them";
    let pinned: Vec<_> = maps::AGENT_PINNED
        .iter()
        .filter(|n| maps_dir.join(n).exists())
        .collect();
    if pinned.is_empty() {
        return Ok(());
    }
    match recorded_version {
        Some(v) if v == maps::AGENT_LAYOUT_VERSION => {}
        Some(v) => bail!(
            "the pinned maps in {} have layout version {v}, this build uses {}: {remedy}",
            maps_dir.display(),
            maps::AGENT_LAYOUT_VERSION
        ),
        None => bail!(
            "maps are pinned in {} without a record of their layout: {remedy}",
            maps_dir.display()
        ),
    }
    for (name, want) in definitions(sizes)? {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        let have = Definition {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if have != want {
            let what = if have.max_entries != want.max_entries
                && (have.map_type, have.key_size, have.value_size)
                    == (want.map_type, want.key_size, want.value_size)
            {
                format!(
                    "{} entries, the configuration asks for {} (ring_size, max_services, \
                     max_flows or max_preference_tables changed)",
                    have.max_entries, want.max_entries
                )
            } else {
                format!("{have:?}, this build's is {want:?}")
            };
            bail!(
                "the pinned map {name} in {} has {what}: {remedy}",
                maps_dir.display()
            );
        }
    }
    Ok(())
}

/// Where each agent map is pinned.
pub(super) fn pin_paths(maps_dir: &Path) -> Vec<(&'static str, PathBuf)> {
    maps::AGENT_PINNED
        .iter()
        .map(|&n| (n, maps_dir.join(n)))
        .collect()
}

/// An XDP link the agent holds.
pub(super) struct HeldLink {
    pub(super) iface: String,
    /// Where it is pinned, if it is.
    pub(super) pin: Option<PathBuf>,
    pub(super) link: FdLink,
}

/// How an interface got the agent's program, with the kernel's tag of each program involved
/// (a hash of its instructions: equal for the same build, different for another build).
/// A tag the kernel would not tell is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new link.
    New { tag: Option<u64> },
    /// This build's program swapped into the link an earlier controller pinned.
    Replaced { old: Option<u64>, new: Option<u64> },
}

/// A program tag as bpftool prints it: 16 hexadecimal digits, or "unknown".
pub fn show_tag(tag: Option<u64>) -> String {
    tag.map_or_else(|| "unknown".to_string(), |t| format!("{t:016x}"))
}

/// The tag of the program a pinned link runs.
fn linked_program_tag(link: &FdLink) -> Result<u64> {
    let id = link.info()?.program_id();
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok(info.tag());
        }
    }
    bail!("no loaded program has the id {id}")
}

impl Dataplane {
    /// Attaches the agent's program to `iface` through a link pinned at `links_dir/iface`:
    /// when one is pinned there (an earlier controller's), this program replaces the one it
    /// runs, atomically; otherwise a new link is made and pinned.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: XdpModeName,
        links_dir: &Path,
    ) -> Result<Attached> {
        let pin = links_dir.join(iface);
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(programs::AGENT)
            .ok_or_else(|| anyhow!("the eBPF object has no program {}", programs::AGENT))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()
                .with_context(|| format!("the kernel refused to load {}", programs::AGENT))?;
        }
        let tag = match prog.info() {
            Ok(info) => Some(info.tag()),
            Err(e) => {
                tracing::warn!("reading the tag of {}: {e}", programs::AGENT);
                None
            }
        };
        if pin.exists() {
            let mut old = None;
            let replaced = PinnedLink::from_pin(&pin)
                .map_err(anyhow::Error::from)
                .map(FdLink::from)
                .inspect(|link| match linked_program_tag(link) {
                    Ok(t) => old = Some(t),
                    Err(e) => tracing::warn!(
                        "reading the tag of the program the link {} runs: {e:#}",
                        pin.display()
                    ),
                })
                .and_then(|l| Ok(XdpLink::try_from(l)?))
                .and_then(|l| Ok(prog.attach_to_link(l)?))
                .and_then(|id| Ok(FdLink::try_from(prog.take_link(id)?)?));
            match replaced {
                Ok(link) => {
                    self.links.push(HeldLink {
                        iface: iface.to_string(),
                        pin: Some(pin),
                        link,
                    });
                    return Ok(Attached::Replaced { old, new: tag });
                }
                Err(e) => {
                    // The interface went away meanwhile (the link is defunct), or the pin
                    // is not a link: start afresh.
                    tracing::warn!(
                        "the pinned link {} cannot take the new program ({e:#}); attaching anew",
                        pin.display()
                    );
                    std::fs::remove_file(&pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                }
            }
        }
        let id = prog.attach(iface, xdp_mode(mode)).with_context(|| {
            format!("attaching {} to {iface} in {mode:?} mode failed (is XDP supported there, and no other program attached?)", programs::AGENT)
        })?;
        let link = FdLink::try_from(prog.take_link(id)?).with_context(|| {
            format!("the kernel attached {iface} without a bpf_link, which cannot be pinned")
        })?;
        let pinned = link
            .pin(&pin)
            .with_context(|| format!("pinning the link of {iface} at {}", pin.display()))?;
        self.links.push(HeldLink {
            iface: iface.to_string(),
            pin: Some(pin),
            link: pinned.into(),
        });
        Ok(Attached::New { tag })
    }

    /// Detaches every interface: removes the links' pins, then closes them.
    pub fn detach_all(&mut self) {
        for l in self.links.drain(..) {
            if let Some(pin) = &l.pin {
                if let Err(e) = std::fs::remove_file(pin) {
                    tracing::warn!("removing {}: {e}", pin.display());
                }
            }
            tracing::info!("detached from {}", l.iface);
            drop(l.link);
        }
    }

    /// What the maps hold that an adopted record is checked against.
    pub fn map_truth(&self) -> Result<MapTruth> {
        let mut truth = MapTruth::default();
        for e in self.services_map.iter() {
            truth
                .services
                .push(e.context("reading the pinned SERVICES map")?);
        }
        for slot in 0..MAX_SERVERS {
            truth.servers.push(
                self.servers_map
                    .get(&slot, 0)
                    .context("reading the pinned SERVERS map")?,
            );
        }
        truth.preferences = self.preference_entries()?;
        Ok(truth)
    }

    /// Takes over the maps an earlier controller left, with its record of them. Returns
    /// how many flows the flow table holds. Services the maps hold that the record does not
    /// know are removed after the next apply.
    pub fn adopt(&mut self, record: InstalledRecord) -> Result<usize> {
        let truth = self.map_truth()?;
        let (installed, strays) = Installed::adopt(self.sizes, record, &truth)?;
        self.installed = installed;
        self.stray_services = strays;
        if let Ok(info) = self.agent_map.get(&0, 0) {
            self.agent_info = info;
        }
        let mut flows = 0;
        super::flows::for_each_flow(&self.flows_map, |_, _| flows += 1)?;
        Ok(flows)
    }

    /// The controller's record of the maps, to keep beside them.
    pub fn record(&self) -> InstalledRecord {
        self.installed.record()
    }
}
