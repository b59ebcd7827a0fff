//! The client side of route optimization: the client's tunnel (TC egress) sends packets for
//! the services it holds a binding for straight to their server's real address.
pub mod tunnel;
