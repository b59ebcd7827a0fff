//! `anycast-bench`: the benchmarks of `anycast_tests::bench` (run as root by
//! `cargo xtask bench`; `--help` lists the options).
use clap::Parser as _;

fn main() {
    anycast_tests::bench::main(anycast_tests::bench::Args::parse());
}
