//! The routed topology's servers: `anycast-ctl server` (decapsulation, the anycast addresses
//! on lo, and with registering servers the binding updates) and the test service.
use std::{net::SocketAddr, time::Duration};

use anyhow::Result;

use super::{Routed, A4, A6, B4, MTU, UDP_PORT};
use crate::{
    netns::{veth, Netns},
    topology::{spi_of, HTTP_PORT},
    workspace_bin,
};

impl Routed {
    pub(super) fn add_server(&mut self, prefix: &str, i: usize) -> Result<()> {
        let s = Netns::new(&format!("{prefix}s{i}"))?;
        let port = format!("sp{i}");
        veth(&s, "eth0", &self.router, &port, MTU)?;
        self.router.ip(&["link", "set", &port, "master", "brs"])?;
        s.ip(&[
            "addr",
            "add",
            &format!("10.73.2.{}/24", 10 + i),
            "dev",
            "eth0",
        ])?;
        s.ip(&[
            "addr",
            "add",
            &format!("fd73:2::{}/64", 10 + i),
            "dev",
            "eth0",
            "nodad",
        ])?;
        s.ip(&["route", "add", "default", "via", "10.73.2.1"])?;
        s.ip(&["-6", "route", "add", "default", "via", "fd73:2::1"])?;
        self.servers.push((None, None, s));
        if self.options.registering.is_none() {
            self.start_server(i - 1)?;
        }
        Ok(())
    }

    /// The anycast addresses server `i` (0-based) answers for: configured servers all three
    /// (each agent's B is its own server's); registering servers A, and B the last one only.
    fn anycast_of(&self, i: usize) -> Vec<String> {
        let mut v = vec![A4.to_string(), A6.to_string()];
        if self.options.registering.is_none() || i + 1 == self.servers.len() {
            v.push(B4.to_string());
        }
        v
    }

    /// Starts server `i` (0-based): `anycast-ctl server` (registering with the agent the
    /// options name, when the servers register) and its test service.
    pub fn start_server(&mut self, i: usize) -> Result<()> {
        let name = format!("s{}", i + 1);
        let ctl = workspace_bin("anycast-ctl")?;
        let mut args: Vec<String> = vec!["server".into(), "--iface".into(), "eth0".into()];
        for a in self.anycast_of(i) {
            args.extend(["--anycast".into(), a]);
        }
        args.extend(["--xdp-mode".into(), "native".into()]);
        if let Some(r) = &self.options.registering {
            args.extend([
                "--agent".into(),
                format!("10.73.2.{}", 2 + r.agent),
                "--id".into(),
                name.clone(),
                "--key".into(),
                self.server_key(i + 1).to_string_lossy().into_owned(),
                "--spi".into(),
                spi_of(&name).to_string(),
                "--lifetime".into(),
                r.lifetime_secs.to_string(),
                "--drain-timeout".into(),
                r.server_drain_secs.to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut decap = self.servers[i]
            .2
            .spawn(&format!("server {name}"), &ctl, &args)?;
        decap.wait_for_line("server ready", Duration::from_secs(20))?;
        self.servers[i].0 = Some(decap);
        self.start_app(i)
    }

    /// Starts server `i`'s (0-based) HTTP service on every address, port 80 (and with
    /// registering servers a UDP service on A, port 5353).
    pub fn start_app(&mut self, i: usize) -> Result<()> {
        let name = format!("s{}", i + 1);
        let tcp = format!("[::]:{HTTP_PORT}");
        let udp = SocketAddr::new(A4.into(), UDP_PORT).to_string();
        let mut args = vec!["--name", &name, "--tcp", &tcp];
        if self.options.registering.is_some() {
            args.extend(["--udp", &udp]);
        }
        let (_, app, ns) = &mut self.servers[i];
        let mut p = ns.spawn(
            &format!("testsrv {name}"),
            &workspace_bin("anycast-testsrv")?,
            &args,
        )?;
        p.wait_for_line("listening", Duration::from_secs(10))?;
        *app = Some(p);
        Ok(())
    }
}
