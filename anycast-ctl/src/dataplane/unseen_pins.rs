//! The budget of pins of flows not seen opening (the data path's `select.rs`): how many per
//! second each CPU may pin, published in `AGENT`. A flow not seen opening is a TCP packet
//! other than a SYN with no handshake in `EMBRYOS`, or a UDP flow's first packet: a flood
//! of those from random sources would otherwise evict pinned flows at its own rate.
use super::*;

/// Pins per second and CPU when the configuration does not say: a 1 M-entry flow table
/// takes 25 s of a flood on two CPUs to turn over, while a legitimate stream of UDP flows
/// or of connections moved from another agent rarely comes near it per CPU. Beyond it a
/// flow is still served, by the table's choice, only not pinned.
pub const DEFAULT_UNSEEN_PINS_PER_SECOND: u32 = 20_000;
/// The most the configuration may ask for: a pin costs at least 100 ns of a CPU's credit.
pub const MAX_UNSEEN_PINS_PER_SECOND: u32 = 10_000_000;

/// The credit a pin costs, in nanoseconds, at `per_second` pins per second.
pub(super) fn cost_ns(per_second: u32) -> u32 {
    1_000_000_000 / per_second.clamp(1, MAX_UNSEEN_PINS_PER_SECOND)
}

impl Dataplane {
    /// At most how many flows not seen opening each CPU pins per second (1 to
    /// [`MAX_UNSEEN_PINS_PER_SECOND`]; a burst of as many); beyond it they go by the table,
    /// unpinned (`flow_unpinned`).
    pub fn set_unseen_pins(&mut self, per_second: u32) -> Result<()> {
        let mut info = self.agent_info;
        info.unseen_pin_cost_ns = cost_ns(per_second);
        if info == self.agent_info {
            return Ok(());
        }
        self.agent_map
            .set(0, info, 0)
            .context("writing the budget of pins of flows not seen opening")?;
        self.agent_info = info;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_costs_a_share_of_a_second() {
        assert_eq!(cost_ns(DEFAULT_UNSEEN_PINS_PER_SECOND), 50_000);
        assert_eq!(cost_ns(0), 1_000_000_000, "never a division by zero");
        assert_eq!(cost_ns(u32::MAX), 100, "never free: 0 would mean no limit");
    }
}
