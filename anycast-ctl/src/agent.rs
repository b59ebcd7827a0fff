//! `anycast-ctl agent`: loads the data path, keeps the maps in line with the configuration,
//! answers the control socket, and detaches cleanly on SIGINT/SIGTERM.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anycast_common::ServiceKey;
use anyhow::{anyhow, bail, Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

use crate::{
    api::{InterfaceStatus, Request, Response, Status},
    config::Config,
    dataplane::{Dataplane, DesiredServer, DesiredService, Sizes},
    sys::{self, HostChanges},
};

/// The services and servers a configuration asks for.
pub fn desired(config: &Config) -> Vec<DesiredService> {
    config
        .services
        .iter()
        .map(|s| DesiredService {
            name: s.name.clone(),
            key: ServiceKey::new(s.address, s.protocol.number(), s.port),
            servers: s
                .servers
                .iter()
                .map(|srv| DesiredServer {
                    name: srv.name.clone(),
                    address: srv.address,
                    weight: srv.weight,
                    up: true,
                })
                .collect(),
        })
        .collect()
}

fn sizes(config: &Config) -> Sizes {
    Sizes {
        ring_size: config.ring_size,
        max_services: config.max_services,
        max_flows: config.max_flows,
    }
}

struct Agent {
    config_path: PathBuf,
    config: Config,
    dataplane: Dataplane,
    interfaces: Vec<InterfaceStatus>,
}

pub async fn run(config_path: &Path, socket: &Path) -> Result<()> {
    let config = Config::load(config_path)
        .map_err(|e| anyhow!("invalid configuration {}: {e}", config_path.display()))?;
    // Everything that can be checked is checked before the host is touched.
    let mut ifindexes = Vec::new();
    for (i, name) in config.interfaces.iter().enumerate() {
        ifindexes.push(
            sys::ifindex(name)
                .map_err(|e| anyhow!("invalid configuration: interfaces[{i}]: {e}"))?,
        );
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!("another agent is already answering on {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let mut host = HostChanges::default();
    // A router forwards; the kernel must also accept the tunnelled packets XDP hands it while
    // a neighbour is being resolved, whose source is the agent's own address.
    if config.agent_address.v4.is_some() {
        host.sysctl("net.ipv4.ip_forward", "1")?;
    }
    if config.agent_address.v6.is_some() {
        host.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    for name in &config.interfaces {
        host.sysctl(&format!("net.ipv4.conf.{name}.accept_local"), "1")?;
    }

    let mut dataplane = Dataplane::new(sizes(&config))?;
    dataplane.set_agent_addresses(config.agent_address.v4, config.agent_address.v6)?;
    for &ifindex in &ifindexes {
        dataplane.add_tx_port(ifindex)?;
    }
    dataplane.apply(&desired(&config))?;
    let mut interfaces = Vec::new();
    for (name, &ifindex) in config.interfaces.iter().zip(&ifindexes) {
        dataplane.attach(name, config.xdp_mode)?;
        tracing::info!(
            "attached to {name} (ifindex {ifindex}) in {:?} XDP mode",
            config.xdp_mode
        );
        interfaces.push(InterfaceStatus {
            name: name.clone(),
            ifindex,
            xdp_mode: format!("{:?}", config.xdp_mode).to_lowercase(),
        });
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    log_services(&config);
    tracing::info!(
        "agent ready: {} services, control socket {}",
        config.services.len(),
        socket.display()
    );

    let mut agent = Agent {
        config_path: config_path.to_path_buf(),
        config,
        dataplane,
        interfaces,
    };
    let mut hup = signal(SignalKind::hangup())?;
    let stop = sys::shutdown_signal();
    tokio::pin!(stop);
    let why = loop {
        tokio::select! {
            why = &mut stop => break why?,
            _ = hup.recv() => {
                if let Err(e) = agent.reload() {
                    tracing::error!("reload refused, configuration unchanged: {e:#}");
                }
            }
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    if let Err(e) = agent.serve(stream).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                }
                Err(e) => tracing::warn!("control socket accept: {e}"),
            },
        }
    };
    tracing::info!("{why}: detaching");
    drop(listener);
    let _ = std::fs::remove_file(socket);
    // Dropping the data plane detaches the XDP program from every interface.
    drop(agent);
    host.undo();
    tracing::info!("agent stopped");
    Ok(())
}

fn log_services(config: &Config) {
    for s in &config.services {
        tracing::info!(
            "service {} {} {} port {}: {} servers",
            s.name,
            s.address,
            s.protocol,
            s.port,
            s.servers.len()
        );
    }
}

impl Agent {
    fn reload(&mut self) -> Result<()> {
        let new = Config::load(&self.config_path).map_err(|e| anyhow!("{e}"))?;
        let fixed = |c: &Config| {
            (
                c.interfaces.clone(),
                c.xdp_mode,
                c.agent_address.clone(),
                sizes(c),
            )
        };
        if fixed(&new) != fixed(&self.config) {
            bail!("interfaces, xdp_mode, agent_address, ring_size, max_services and max_flows only change on restart");
        }
        self.dataplane.apply(&desired(&new))?;
        self.config = new;
        log_services(&self.config);
        tracing::info!("configuration reloaded from {}", self.config_path.display());
        Ok(())
    }

    fn status(&self) -> Result<Status> {
        Ok(Status {
            config: self.config_path.clone(),
            interfaces: self.interfaces.clone(),
            agent_v4: self.config.agent_address.v4,
            agent_v6: self.config.agent_address.v6,
            dataplane: self.dataplane.report()?,
        })
    }

    async fn serve(&mut self, stream: UnixStream) -> Result<()> {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            BufReader::new(read).read_line(&mut line),
        )
        .await
        .context("client sent no request")??;
        let response = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(Request::Status) => match self.status() {
                Ok(s) => Response::Status(Box::new(s)),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Ok(Request::Reload) => match self.reload() {
                Ok(()) => Response::Reloaded,
                Err(e) => {
                    tracing::error!("reload refused, configuration unchanged: {e:#}");
                    Response::Error {
                        message: format!("reload refused, configuration unchanged: {e:#}"),
                    }
                }
            },
        };
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
        Ok(())
    }
}
