//! What the data path does with ICMP to the anycast addresses: answer echo requests
//! (`answer_ping`), tunnel errors about services' replies to their servers
//! (`forward_icmp_errors`); both flags of `AGENT`. `SERVICE_ADDRS` holds every service's
//! address, the addresses whose echo requests are answered.
use std::collections::BTreeSet;

use super::*;

impl Dataplane {
    /// Whether the data path answers echo requests to the anycast addresses and tunnels
    /// ICMP errors about services' replies to the servers. Off, it passes them to the kernel
    /// (`pass_not_service`), as any other packet for no service.
    pub fn set_icmp(&mut self, answer_ping: bool, forward_errors: bool) -> Result<()> {
        let mut info = self.agent_info;
        info.flags &= !(AGENT_ANSWER_PING | AGENT_FORWARD_ICMP_ERRORS);
        if answer_ping {
            info.flags |= AGENT_ANSWER_PING;
        }
        if forward_errors {
            info.flags |= AGENT_FORWARD_ICMP_ERRORS;
        }
        if info == self.agent_info {
            return Ok(());
        }
        self.agent_map
            .set(0, info, 0)
            .context("writing the ICMP flags")?;
        self.agent_info = info;
        Ok(())
    }

    /// Makes `SERVICE_ADDRS` hold exactly the addresses of `desired` (read back from the
    /// map, so entries an adopted map holds from an earlier controller are removed too).
    /// After the services are written: an address briefly missing only means its echo
    /// requests go to the kernel.
    pub(super) fn sync_service_addresses(&mut self, desired: &[DesiredService]) -> Result<()> {
        let want: BTreeSet<AddressKey> = desired
            .iter()
            .map(|s| AddressKey::new(s.key.ip()))
            .collect();
        let have: BTreeSet<AddressKey> = self
            .service_addrs
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the service addresses")?;
        for k in have.difference(&want) {
            match self.service_addrs.remove(k) {
                Err(e) if !is_enoent(&e) => {
                    return Err(e).context("removing a service address");
                }
                _ => {}
            }
        }
        for k in want.difference(&have) {
            self.service_addrs
                .insert(k, 1, 0)
                .context("adding a service address")?;
        }
        Ok(())
    }

    /// The addresses in `SERVICE_ADDRS`.
    pub fn service_addresses(&self) -> Result<BTreeSet<IpAddr>> {
        self.service_addrs
            .keys()
            .map(|k| k.map(|k| k.ip()).context("reading the service addresses"))
            .collect()
    }
}
