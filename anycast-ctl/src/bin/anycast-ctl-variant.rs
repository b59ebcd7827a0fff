//! anycast-ctl-variant: anycast-ctl built with the test-only `upgrade-variant` feature. It is
//! anycast-ctl in every way but the agent's XDP program, whose instructions (and so its
//! kernel tag) differ while its maps are the same: another build to upgrade the data path
//! to and back, under load (the restart test, the bench's restart part). Built by `cargo
//! xtask build --release` and `cargo xtask test`.
#[path = "../main.rs"]
mod anycast_ctl;

fn main() -> std::process::ExitCode {
    anycast_ctl::main()
}
