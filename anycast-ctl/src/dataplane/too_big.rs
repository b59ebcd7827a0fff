//! Answers to client packets too big for the tunnel (the data path's `too_big.rs`): on or
//! off, and how many per second each CPU may send, published in `AGENT`.
use super::*;

/// Answers per second and CPU when the configuration does not say.
pub const DEFAULT_TOO_BIG_ANSWERS_PER_SECOND: u32 = 1000;
/// The most the configuration may ask for: one answer costs at least a microsecond of a
/// CPU's credit.
pub const MAX_TOO_BIG_ANSWERS_PER_SECOND: u32 = 1_000_000;

/// The credit an answer costs, in nanoseconds, at `per_second` answers per second.
pub(super) fn cost_ns(per_second: u32) -> u32 {
    1_000_000_000 / per_second.clamp(1, MAX_TOO_BIG_ANSWERS_PER_SECOND)
}

impl Dataplane {
    /// Whether client packets too big for the tunnel are answered (ICMP "fragmentation
    /// needed" for IPv4 with DF, ICMPv6 "packet too big"), and at most how many per second
    /// each CPU sends (1 to [`MAX_TOO_BIG_ANSWERS_PER_SECOND`]; a burst of as many). Off,
    /// they are dropped silently (`drop_too_big`).
    pub fn set_too_big_answers(&mut self, on: bool, per_second: u32) -> Result<()> {
        let mut info = self.agent_info;
        if on {
            info.flags |= AGENT_ANSWER_TOO_BIG;
        } else {
            info.flags &= !AGENT_ANSWER_TOO_BIG;
        }
        info.too_big_cost_ns = cost_ns(per_second);
        if info == self.agent_info {
            return Ok(());
        }
        self.agent_map
            .set(0, info, 0)
            .context("writing the too-big answer settings")?;
        self.agent_info = info;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_costs_a_share_of_a_second() {
        assert_eq!(cost_ns(1), 1_000_000_000);
        assert_eq!(cost_ns(1000), 1_000_000);
        assert_eq!(cost_ns(3), 333_333_333);
        assert_eq!(cost_ns(0), 1_000_000_000, "never a division by zero");
        assert_eq!(cost_ns(u32::MAX), 1000);
    }
}
