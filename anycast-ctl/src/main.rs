//! anycast-ctl: the anycast agent daemon, the server side, and the operator's CLI.
use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anycast_ctl::{
    agent, cli as status,
    client::control::{
        self as client_control, Request as ClientRequest, Response as ClientResponse,
    },
    config::{Config, XdpModeName},
    control_socket::{self as api, Request, Response},
    registration::{keys, server::LoadSource},
    server,
};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "anycast-ctl",
    version,
    about = "Anycast agent: XDP forwarding to self-registering servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Native,
    Generic,
    Auto,
}

impl From<Mode> for XdpModeName {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Native => XdpModeName::Native,
            Mode::Generic => XdpModeName::Generic,
            Mode::Auto => XdpModeName::Auto,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach the XDP forwarder and serve the configured services.
    #[command(after_long_help = anycast_ctl::manual::agent_help())]
    Agent {
        /// The configuration file (JSON with `//` comments).
        #[arg(long)]
        config: PathBuf,
        /// Control socket for `status` and `reload`.
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Instead of running: remove what a crashed agent of this configuration left
        /// (pinned links and maps: forwarding stops), restore the original sysctls.
        #[arg(long)]
        cleanup: bool,
    },
    /// Check a configuration file without touching the system.
    Check {
        /// The configuration file (JSON with `//` comments).
        #[arg(long)]
        config: PathBuf,
    },
    /// Show services, servers and counters of a running agent.
    Status {
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the agent's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the servers' bindings (age, lifetime left, load, state) and the registration counters.
    Bindings {
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the flow table: each client flow and the server it is pinned to.
    Flows {
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A live view: per service and server packets/s, bytes/s, new flows/s, state and
    /// weight, and the verdicts' rates, refreshed every second; `q` quits. Plain lines when
    /// stdout is not a terminal.
    Top {
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Refresh interval in milliseconds (100-60000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60000))]
        interval_ms: u64,
        /// Stop after this many refreshes (default: until `q`, or forever without a terminal).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Drain a server (by name): no new flows, its open flows stay. `--undo` ends the drain.
    Drain {
        server: String,
        #[arg(long)]
        undo: bool,
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Make a running agent re-read its configuration file (same as SIGHUP).
    Reload {
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Run the server side: decapsulate tunnelled packets, hold the anycast addresses on lo,
    /// and (with --agent) register with the agents, refresh, report load, and deregister on exit.
    Server {
        /// Interface(s) the tunnelled packets arrive on.
        #[arg(long = "iface", required = true)]
        interfaces: Vec<String>,
        /// Anycast address(es) this server answers for: ADDR, ADDR:PROTO:PORT or [IPV6]:PROTO:PORT.
        #[arg(long = "anycast", required = true)]
        anycast: Vec<server::AnycastSpec>,
        #[arg(long, value_enum, default_value = "native")]
        xdp_mode: Mode,
        /// Agent to register with, ADDR or ADDR:PORT / [IPV6]:PORT (repeat for several agents).
        #[arg(long = "agent")]
        agents: Vec<String>,
        /// The address all agents share (their registration.discovery_address), ADDR or
        /// ADDR:PORT / [IPV6]:PORT: ask it for the list of agents and register with each,
        /// asking again at half the list's lifetime.
        #[arg(long = "agent-discovery")]
        agent_discovery: Option<String>,
        /// This server's identity (the agent's policy names it).
        #[arg(long)]
        id: Option<String>,
        /// File with this server's secret key (hex). Without it, and with --certificate and
        /// --signing-key, the binding updates are signed with the certificate's key instead
        /// (the agents need registration.certificates).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Security parameter index of the key.
        #[arg(long, default_value_t = 256)]
        spi: u32,
        /// Real address(es) to bind through (default: the interfaces' global addresses).
        #[arg(long = "real")]
        real: Vec<IpAddr>,
        /// Requested binding lifetime in seconds (4-second units).
        #[arg(long, default_value_t = 60)]
        lifetime: u64,
        /// Priority reported in the load information.
        #[arg(long, default_value_t = 0)]
        priority: u16,
        /// Most sessions this server takes (reported with the established connection count).
        #[arg(long, default_value_t = 0)]
        max_sessions: u32,
        /// Command printing "USED MAX" capacity, instead of counting connections.
        #[arg(long)]
        load_cmd: Option<String>,
        /// After deregistering, seconds to let open connections finish.
        #[arg(long, default_value_t = 30)]
        drain_timeout: u64,
        /// Send each connection's SYN-ACK back through the (first) agent, IP-in-IP, so that
        /// the agent can tell that this server answers the new flows it is given (TC egress
        /// program on the --iface interfaces; enables forwarding on lo, see the README).
        #[arg(long, requires = "agents")]
        reverse_tunnel: bool,
        /// Route optimization: this server's certificate (anycast-ctl pki issue); with
        /// --signing-key, new TCP clients are sent a signed binding to this server's real
        /// address (UDP 4193), and lifetime 0 when the server stops.
        #[arg(long, requires = "signing_key")]
        certificate: Option<PathBuf>,
        /// The private key the certificate names (anycast-ctl pki keygen).
        #[arg(long, requires = "certificate")]
        signing_key: Option<PathBuf>,
        /// Lifetime of the bindings sent to clients, seconds (refreshed at a third of it
        /// while the client has a connection).
        #[arg(long, default_value_t = 60)]
        client_binding_lifetime: u64,
    },
    /// Route optimization, the client's side: take servers' signed bindings (UDP 4193), check
    /// them against the operator's key, and tunnel a bound service's packets straight to its
    /// server (TC egress on --interface). Without it the client goes through the agent.
    Client {
        /// The operator's public key (anycast-ctl pki keygen); repeat for several.
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        /// The operator's revocation list (anycast-ctl pki revoke).
        #[arg(long)]
        revocations: Option<PathBuf>,
        /// The interface the client's traffic leaves on (the tunnel's TC egress hook).
        #[arg(long)]
        interface: String,
        /// This client's address(es) (default: the interface's global addresses).
        #[arg(long = "address")]
        addresses: Vec<IpAddr>,
        #[arg(long, default_value_t = anycast_common::wire::CLIENT_PORT)]
        port: u16,
        /// Most bindings checked a second (one check costs 150-200 us); more are dropped
        /// unchecked and counted.
        #[arg(long, default_value_t = 1000)]
        checks_per_second: u32,
        /// End a binding whose server sent nothing for this many seconds while the tunnel
        /// carried packets.
        #[arg(long, default_value_t = 30)]
        unanswered_timeout: u64,
        /// How far a binding's timestamp may be from this clock, seconds.
        #[arg(long, default_value_t = 30)]
        window: u64,
        /// Longest binding lifetime taken, seconds.
        #[arg(long, default_value_t = 600)]
        max_lifetime: u64,
        /// Write the counters and bindings (JSON) to this file every half second.
        #[arg(long)]
        status_file: Option<PathBuf>,
        /// Control socket for `client-status`, `client-bindings`, `client-unbind` and
        /// `client-reload` (mode 0600; root and the daemon's user only).
        #[arg(long, default_value = client_control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
    },
    /// Show a running client daemon's revocation list, bindings and counters.
    ClientStatus {
        #[arg(long, default_value = client_control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the daemon's JSON answer instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// List the bindings a running client daemon holds (service, server, real address).
    ClientBindings {
        #[arg(long, default_value = client_control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// End a client daemon's binding now: the service goes back through the agent (until
    /// its server binds the client again; to keep a server out, revoke its certificate).
    ClientUnbind {
        /// ADDR (every binding of the anycast address), ADDR:PROTO:PORT or [IPV6]:PROTO:PORT.
        service: server::AnycastSpec,
        #[arg(long, default_value = client_control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Make a running client daemon re-read its --revocations file now (same as SIGHUP).
    ClientReload {
        #[arg(long, default_value = client_control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// The operator's trust anchor: key pairs, server certificates, the revocation list.
    Pki {
        #[command(subcommand)]
        command: anycast_ctl::pki::PkiCommand,
    },
    /// Attach an XDP program that passes every frame (for veth peers of an agent in native mode).
    Passthrough {
        #[arg(long = "iface", required = true)]
        interfaces: Vec<String>,
        #[arg(long, value_enum, default_value = "native")]
        xdp_mode: Mode,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    #[command(after_long_help = COMPLETIONS_HELP)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (anycast-ctl.1 and one per command) into DIR.
    ManPages { dir: PathBuf },
}

const COMPLETIONS_HELP: &str = "\
The Debian package installs them for bash, zsh and fish. By hand, e.g.:
  anycast-ctl completions bash > /etc/bash_completion.d/anycast-ctl
  anycast-ctl completions zsh > /usr/local/share/zsh/site-functions/_anycast-ctl
  anycast-ctl completions fish > ~/.config/fish/completions/anycast-ctl.fish";

// Public for anycast-ctl-variant, which is this file with another eBPF object.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Completions { shell } => {
            let cli = <Cli as clap::CommandFactory>::command();
            print!("{}", anycast_ctl::manual::completions(shell, cli));
            Ok(())
        }
        Command::ManPages { dir } => {
            let cli = <Cli as clap::CommandFactory>::command();
            anycast_ctl::manual::write_pages(cli, &dir)
                .map_err(|e| anyhow::anyhow!("writing man pages into {}: {e}", dir.display()))
        }
        Command::Agent {
            config,
            socket,
            cleanup: false,
        } => agent::run(&config, &socket).await,
        Command::Agent {
            config,
            socket,
            cleanup: true,
        } => agent::cleanup(&config, &socket),
        Command::Check { config } => {
            let invalid = |e| anyhow::anyhow!("invalid configuration: {e}");
            let c = Config::load(&config).map_err(invalid)?;
            // What the agent would refuse at start: unreadable, bad, shared or unprotected
            // keys, unknown control groups.
            let keys = c.load_keys(&config).map_err(invalid)?;
            c.load_relay_keys(&config).map_err(invalid)?;
            // The operator keys and the revocation list of certificate-signed registration.
            anycast_ctl::registration::agent::CertificatePolicy::load(&c, &config)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e:#}"))?;
            c.control_access().map_err(invalid)?;
            for w in c.warnings() {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: {} services, {} servers, {} keys: ok",
                config.display(),
                c.services.len(),
                c.services.iter().map(|s| s.servers.len()).sum::<usize>(),
                keys.len()
            );
            Ok(())
        }
        Command::Status { socket, json } => match api::call(&socket, &Request::Status).await? {
            Response::Status(s) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    print!("{}", status::render(&s));
                }
                Ok(())
            }
            Response::Error { message } => anyhow::bail!("{message}"),
            other => anyhow::bail!("unexpected answer {other:?}"),
        },
        Command::Top {
            socket,
            interval_ms,
            count,
        } => {
            anycast_ctl::top::run(
                &socket,
                std::time::Duration::from_millis(interval_ms),
                count,
            )
            .await
        }
        Command::Bindings { socket, json } => match api::call(&socket, &Request::Bindings).await? {
            Response::Bindings(b) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&b)?);
                } else {
                    print!("{}", status::render_bindings(&b));
                }
                Ok(())
            }
            Response::Error { message } => anyhow::bail!("{message}"),
            other => anyhow::bail!("unexpected answer {other:?}"),
        },
        Command::Flows { socket, json } => match api::call(&socket, &Request::Flows).await? {
            Response::Flows { flows } => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&flows)?);
                } else {
                    print!("{}", status::render_flows(&flows));
                }
                Ok(())
            }
            Response::Error { message } => anyhow::bail!("{message}"),
            other => anyhow::bail!("unexpected answer {other:?}"),
        },
        Command::Drain {
            server,
            undo,
            socket,
        } => match api::call(&socket, &Request::Drain { server, undo }).await? {
            Response::Drained { server, drained } => {
                println!(
                    "{server}: {}; drained now: {}",
                    if undo { "undrained" } else { "drained" },
                    if drained.is_empty() {
                        "none".to_string()
                    } else {
                        drained.join(", ")
                    }
                );
                Ok(())
            }
            Response::Error { message } => anyhow::bail!("{message}"),
            other => anyhow::bail!("unexpected answer {other:?}"),
        },
        Command::Reload { socket } => match api::call(&socket, &Request::Reload).await? {
            Response::Reloaded => {
                println!("reloaded");
                Ok(())
            }
            Response::Error { message } => anyhow::bail!("{message}"),
            other => anyhow::bail!("unexpected answer {other:?}"),
        },
        Command::Server {
            interfaces,
            anycast,
            xdp_mode,
            agents,
            agent_discovery,
            id,
            key,
            spi,
            real,
            lifetime,
            priority,
            max_sessions,
            load_cmd,
            drain_timeout,
            reverse_tunnel,
            certificate,
            signing_key,
            client_binding_lifetime,
        } => {
            let route_optimization = match (certificate, signing_key) {
                (Some(c), Some(k)) => Some(server::RouteOptimization {
                    certificate: anycast_ctl::pki::read_certificate(&c)?,
                    key: anycast_ctl::pki::read_signing_key(&k)?,
                    lifetime: std::time::Duration::from_secs(client_binding_lifetime.max(4)),
                }),
                _ => None,
            };
            // No --key but a certificate: register with the certificate.
            let by_certificate = match (&key, &route_optimization) {
                (None, Some(ro)) => {
                    Some(anycast_ctl::registration::server::RegistrationCertificate {
                        certificate: ro.certificate.as_bytes().to_vec(),
                        key: ro.key.clone(),
                    })
                }
                _ => None,
            };
            let registration = if agents.is_empty() && agent_discovery.is_none() {
                if id.is_some() || key.is_some() {
                    anyhow::bail!("--id and --key need --agent or --agent-discovery");
                }
                None
            } else {
                let agents = agents
                    .iter()
                    .map(|a| parse_agent(a))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let discovery = agent_discovery.as_deref().map(parse_agent).transpose()?;
                // With a certificate the identity defaults to the certificate's.
                let cert_identity = route_optimization
                    .as_ref()
                    .filter(|_| by_certificate.is_some())
                    .map(|ro| ro.certificate.body.identity.clone());
                let identity = id
                    .or(cert_identity)
                    .ok_or_else(|| anyhow::anyhow!("--agent and --agent-discovery need --id"))?;
                let key = match key {
                    Some(k) => keys::read_key(&k)?,
                    None if by_certificate.is_some() => Vec::new(),
                    None => anyhow::bail!(
                        "--agent and --agent-discovery need --key (or --certificate and \
                         --signing-key to register with the certificate)"
                    ),
                };
                Some(server::RegistrationOptions {
                    agents,
                    discovery,
                    identity,
                    spi,
                    key,
                    certificate: by_certificate,
                    real,
                    lifetime: std::time::Duration::from_secs(lifetime),
                    priority,
                    load: match load_cmd {
                        Some(c) => LoadSource::Command(c),
                        None => LoadSource::Sockets { max_sessions },
                    },
                    drain_timeout: std::time::Duration::from_secs(drain_timeout),
                    reverse_tunnel,
                })
            };
            server::run(server::ServerOptions {
                interfaces,
                anycast,
                xdp_mode: xdp_mode.into(),
                registration,
                route_optimization,
            })
            .await
        }
        Command::Pki { command } => anycast_ctl::pki::run(command),
        Command::Client {
            trust,
            revocations,
            interface,
            addresses,
            port,
            checks_per_second,
            unanswered_timeout,
            window,
            max_lifetime,
            status_file,
            control_socket,
        } => {
            anycast_ctl::client::daemon::run(anycast_ctl::client::daemon::ClientOptions {
                trust,
                revocations,
                interface,
                addresses,
                port,
                checks_per_second,
                unanswered_timeout: std::time::Duration::from_secs(unanswered_timeout),
                window,
                max_lifetime,
                status_file,
                control_socket,
            })
            .await
        }
        Command::ClientStatus { socket, json } => {
            let s = client_status(&socket).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", client_control::render_status(&s));
            }
            Ok(())
        }
        Command::ClientBindings { socket, json } => {
            let s = client_status(&socket).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.bindings)?);
            } else {
                print!("{}", client_control::render_bindings(&s));
            }
            Ok(())
        }
        Command::ClientUnbind { service, socket } => {
            let request = ClientRequest::Unbind {
                anycast: service.address,
                protocol: service.selector.map_or(0, |s| s.protocol),
                port: service.selector.map_or(0, |s| s.port),
            };
            match client_call(&socket, &request).await? {
                ClientResponse::Unbound { ended } => {
                    for e in ended {
                        println!("ended {e}: back to the agent");
                    }
                    Ok(())
                }
                ClientResponse::Error { message } => anyhow::bail!("{message}"),
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
        Command::ClientReload { socket } => {
            match client_call(&socket, &ClientRequest::ReloadRevocations).await? {
                ClientResponse::RevocationsReloaded {
                    outcome,
                    number,
                    ended,
                } => {
                    println!("revocation list number {number}: {outcome}");
                    for e in ended {
                        println!("ended {e}: revoked, back to the agent");
                    }
                    Ok(())
                }
                ClientResponse::Error { message } => anyhow::bail!("{message}"),
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
        Command::Passthrough {
            interfaces,
            xdp_mode,
        } => server::passthrough(&interfaces, xdp_mode.into()).await,
    }
}

async fn client_call(
    socket: &std::path::Path,
    request: &ClientRequest,
) -> anyhow::Result<ClientResponse> {
    api::call_daemon(socket, request, "the client daemon", "anycast-ctl client").await
}

async fn client_status(
    socket: &std::path::Path,
) -> anyhow::Result<anycast_ctl::client::daemon::ClientStatus> {
    match client_call(socket, &ClientRequest::Status).await? {
        ClientResponse::Status(s) => Ok(*s),
        ClientResponse::Error { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// `ADDR`, `ADDR:PORT` or `[IPV6]:PORT`; the port defaults to the registration port.
fn parse_agent(s: &str) -> anyhow::Result<std::net::SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(std::net::SocketAddr::new(
            ip,
            anycast_common::wire::DEFAULT_PORT,
        ));
    }
    s.parse()
        .map_err(|_| anyhow::anyhow!("--agent {s}: expected ADDR, ADDR:PORT or [IPV6]:PORT"))
}
