//! One check of one target, by kind: each returns a detail string or why it failed.
use super::*;

mod command;
mod http;
pub(super) mod icmp;
mod tcp;

use command::run_command;
use http::http;
pub(super) use icmp::Pinger;
use tcp::tcp;

pub(crate) type Probe = Pin<Box<dyn Future<Output = Result<String, String>>>>;

/// Builds the checks' futures; owns the ICMP sockets (opened on first use) and their readers.
pub(crate) struct Probes {
    pub(crate) ident: u16,
    pub(crate) cookie: u64,
    pub(crate) v4: Option<Rc<Pinger>>,
    pub(crate) v6: Option<Rc<Pinger>>,
    pub(crate) readers: JoinSet<()>,
}

impl Probes {
    pub(crate) fn pinger(&mut self, v6: bool) -> Result<Rc<Pinger>, String> {
        let slot = if v6 { &mut self.v6 } else { &mut self.v4 };
        if let Some(p) = slot {
            return Ok(p.clone());
        }
        let p = Pinger::open(v6, self.ident, self.cookie).map_err(|e| {
            format!(
                "cannot open the raw ICMP{} socket: {e}",
                if v6 { "v6" } else { "" }
            )
        })?;
        let p = Rc::new(p);
        self.readers.spawn_local(p.clone().receive());
        *slot = Some(p.clone());
        Ok(p)
    }

    pub(crate) fn probe(&mut self, target: &Target, kind: &CheckKind) -> Probe {
        let real = target.real.to_canonical();
        let port = |p: &Option<u16>| p.unwrap_or(target.port);
        let no_port = || -> Probe {
            Box::pin(std::future::ready(Err(
                "no port: the service has any port (0); give the check a port".to_string(),
            )))
        };
        match kind {
            CheckKind::Icmp => match self.pinger(real.is_ipv6()) {
                Ok(p) => Box::pin(async move { p.ping(real).await }),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            },
            CheckKind::Tcp { port: p } => match port(p) {
                0 => no_port(),
                p => Box::pin(tcp(SocketAddr::new(real, p))),
            },
            CheckKind::Http {
                port: p,
                path,
                host,
                expect,
            } => {
                let p = port(p);
                if p == 0 {
                    return no_port();
                }
                let addr = SocketAddr::new(real, p);
                let host = host.clone().unwrap_or_else(|| match (p, real) {
                    (80, IpAddr::V4(a)) => a.to_string(),
                    (80, IpAddr::V6(a)) => format!("[{a}]"),
                    _ => addr.to_string(),
                });
                let expect = expect.clone().unwrap_or_else(|| DEFAULT_EXPECT.into());
                Box::pin(http(addr, path.clone(), host, expect))
            }
            CheckKind::Command { command } => Box::pin(run_command(
                command.clone(),
                target.server.clone(),
                target.real,
                target.port,
            )),
        }
    }
}

pub(crate) fn fmt_elapsed(since: Instant) -> String {
    format!("{:.2}ms", since.elapsed().as_secs_f64() * 1000.0)
}

pub(crate) fn connect_error(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        _ => format!("connect: {e}"),
    }
}

pub(crate) async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr).await.map_err(connect_error)?;
    // Close with a reset: checks several times a second would otherwise leave hundreds of
    // TIME_WAIT sockets per target on the agent.
    let _ = stream.set_zero_linger();
    Ok(stream)
}
