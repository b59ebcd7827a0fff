//! Loading the eBPF object with the agent's map sizes, and attaching its programs.
use super::*;

use crate::config::XdpModeName;

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/anycast"));

/// Map sizes chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub ring_size: u32,
    pub max_services: u32,
    pub max_flows: u32,
    /// Consistent-hash tables for topology preferences (one per preference that has servers
    /// able to take new flows), over all services. Each costs two tables of `ring_size`
    /// entries in `RINGS`, like a service.
    pub max_preference_tables: u32,
    /// Entries of the client tunnel's `CLIENT_FLOWS`: only the client daemon uses it.
    pub max_client_flows: u32,
    /// Entries of the server's `SERVER_UDP_FLOWS`: only the server uses it.
    pub max_server_udp_flows: u32,
}

impl Sizes {
    /// Sizes with the default number of preference tables.
    pub const fn new(ring_size: u32, max_services: u32, max_flows: u32) -> Self {
        Sizes {
            ring_size,
            max_services,
            max_flows,
            max_preference_tables: DEFAULT_MAX_PREFERENCE_TABLES,
            max_client_flows: 1,
            max_server_udp_flows: 1,
        }
    }

    /// Entries of `RINGS`: two tables per service and per preference table.
    pub fn ring_entries(&self) -> Option<u32> {
        self.max_services
            .checked_add(self.max_preference_tables)?
            .checked_mul(2)?
            .checked_mul(self.ring_size)
    }
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes::new(DEFAULT_RING_SIZE, DEFAULT_MAX_SERVICES, DEFAULT_MAX_FLOWS)
    }
}

/// Loads the eBPF object with the agent's maps sized as asked.
pub fn load_object(sizes: Sizes) -> Result<Ebpf> {
    load_object_pinned(sizes, &[])
}

/// Loads the eBPF object with the agent's maps sized as asked; each map named in `pins` is
/// the one pinned at its path (made and pinned there if none is).
pub(super) fn load_object_pinned(
    sizes: Sizes,
    pins: &[(&'static str, std::path::PathBuf)],
) -> Result<Ebpf> {
    let ring_entries = sizes.ring_entries().ok_or_else(|| {
        anyhow!(
            "the consistent-hash tables do not fit one map: 2 x (max_services {} + \
             max_preference_tables {}) x ring_size {} entries",
            sizes.max_services,
            sizes.max_preference_tables,
            sizes.ring_size
        )
    })?;
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(maps::RINGS, ring_entries)
        .map_max_entries(maps::FLOWS, sizes.max_flows)
        .map_max_entries(maps::SERVICES, sizes.max_services)
        .map_max_entries(maps::SERVICE_STATS, sizes.max_services)
        .map_max_entries(maps::SERVICE_ADDRS, sizes.max_services)
        .map_max_entries(maps::CLIENT_FLOWS, sizes.max_client_flows.max(1))
        .map_max_entries(maps::SERVER_UDP_FLOWS, sizes.max_server_udp_flows.max(1));
    for (name, path) in pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (are you root, with BPF and XDP available?)")
}

pub fn xdp_mode(mode: XdpModeName) -> XdpMode {
    match mode {
        XdpModeName::Native => XdpMode::Driver,
        XdpModeName::Generic => XdpMode::Skb,
        XdpModeName::Auto => XdpMode::Default,
    }
}

/// Loads (once) and attaches an XDP program of the object to an interface.
pub fn attach(ebpf: &mut Ebpf, program: &str, iface: &str, mode: XdpModeName) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("the kernel refused to load {program}"))?;
    }
    prog.attach(iface, xdp_mode(mode)).with_context(|| {
        format!("attaching {program} to {iface} in {mode:?} mode failed (is XDP supported there, and no other program attached?)")
    })?;
    Ok(())
}

/// Loads (once) a TC program of the object and attaches it to an interface's egress through
/// the clsact qdisc (which the caller adds), as a netlink `cls_bpf` filter in direct-action
/// mode, so `tc filter show dev IF egress` lists it. Filters of the same program name left
/// by an earlier run that was killed are removed first. Dropping the object detaches it.
pub fn attach_tc_egress(ebpf: &mut Ebpf, program: &str, iface: &str) -> Result<()> {
    use aya::programs::{
        tc::{qdisc_detach_program, NlOptions, TcAttachOptions, TcError},
        SchedClassifier, TcAttachType,
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("the kernel refused to load {program}"))?;
    }
    match qdisc_detach_program(iface, TcAttachType::Egress, program) {
        Ok(()) => tracing::info!("removed a stale {program} filter from {iface}"),
        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("looking for stale {program} filters on {iface}"))
        }
    }
    prog.attach_with_options(
        iface,
        TcAttachType::Egress,
        TcAttachOptions::Netlink(NlOptions::default()),
    )
    .with_context(|| format!("attaching {program} to {iface} egress"))?;
    Ok(())
}

pub(crate) fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Forwards what the eBPF programs log (aya-log: rare events only, never per packet) to the
/// process's log, on a task of its own. The logger owns the log map and lives with the task.
/// Without it the programs run the same; their records are dropped when the ring is full.
pub fn spawn_ebpf_logger(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("the eBPF programs' log is not forwarded: {e}");
            return;
        }
    };
    // SAFETY: the logger owns the log map's descriptor; it stays open, the same, as long as
    // the AsyncFd (which owns the logger) lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("the eBPF programs' log is not forwarded: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
