//! The owner task's part in flows that move between agents (`dataplane::pins` finds and
//! installs, `relay::pins` is the wire): hands each newly published view of the tables to
//! the sweeper's thread, relays the exceptions it finds, and passes the pins peers send
//! (authenticated, within their rate) back to it. Nothing here touches the flow table.
use std::{collections::HashMap, time::Instant};

use anycast_common::wire;

use super::state::Agent;
use crate::{
    dataplane::{FlowPin, PinsFound, PinsHandle},
    relay::pins::{Bucket, PinSender, RECEIVE_PER_SECOND},
};

pub(super) struct FlowPins {
    pub(super) handle: PinsHandle,
    sender: PinSender,
    /// Per peer (configured peers only: the envelope was authenticated): pins per second.
    received: HashMap<String, Bucket>,
}

impl FlowPins {
    pub(super) fn new(handle: PinsHandle) -> FlowPins {
        FlowPins {
            handle,
            sender: PinSender::default(),
            received: HashMap::new(),
        }
    }
}

impl Agent {
    /// After a publish: the live tables to the sweeper's thread, which looks for the
    /// exceptions at once (only when the tables or slots changed).
    pub(super) fn publish_pin_view(&mut self) {
        if let Some(p) = &self.pins {
            p.handle.publish(self.dataplane.pin_view());
        }
    }

    /// The exceptions the sweeper's thread found: new ones to every peer now, all of them
    /// every few seconds, within the sending budget.
    pub(super) fn send_pins(&mut self, found: PinsFound) {
        let (Some(p), Some(relay)) = (self.pins.as_mut(), self.relay.as_mut()) else {
            return;
        };
        let batch = p.sender.round(found.pins, Instant::now());
        if batch.is_empty() {
            return;
        }
        if found.after_publish {
            tracing::debug!("relaying {} flow pins after a table change", batch.len());
        }
        let out = relay.flow_pins(&batch, wire::ntp_now());
        self.send_relay(out);
    }

    /// Pins from peer `peer` (its envelope authenticated): within its rate, to the sweeper's
    /// thread, which checks them against this agent's own services and servers.
    pub(super) fn take_pins(&mut self, peer: &str, mut pins: Vec<FlowPin>) {
        let (Some(p), Some(relay)) = (self.pins.as_mut(), self.relay.as_mut()) else {
            return;
        };
        let total = pins.len();
        relay.add("relay_received_pins", total as u64);
        let allowed = p
            .received
            .entry(peer.to_string())
            .or_insert_with(|| Bucket::new(RECEIVE_PER_SECOND))
            .take(total, Instant::now());
        if allowed < total {
            relay.add("pins_refused_rate", (total - allowed) as u64);
            pins.truncate(allowed);
        }
        if !pins.is_empty() && !p.handle.install(pins) {
            relay.add("pins_refused_queue_full", allowed as u64);
        }
    }
}
