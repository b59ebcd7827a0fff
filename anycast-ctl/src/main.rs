//! anycast-ctl: the anycast agent daemon, the server side, and the operator's CLI.
use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anycast_ctl::{
    agent,
    api::{self, Request, Response},
    config::{Config, XdpModeName},
    server, status,
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
    Agent {
        #[arg(long)]
        config: PathBuf,
        /// Control socket for `status` and `reload`.
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Check a configuration file without touching the system.
    Check {
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
    /// Make a running agent re-read its configuration file (same as SIGHUP).
    Reload {
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Run the server side: decapsulate tunnelled packets and hold the anycast addresses on lo.
    Server {
        /// Interface(s) the tunnelled packets arrive on.
        #[arg(long = "iface", required = true)]
        interfaces: Vec<String>,
        /// Anycast address(es) this server answers for.
        #[arg(long = "anycast", required = true)]
        anycast: Vec<IpAddr>,
        #[arg(long, value_enum, default_value = "native")]
        xdp_mode: Mode,
    },
    /// Attach an XDP program that passes every frame (for veth peers of an agent in native mode).
    Passthrough {
        #[arg(long = "iface", required = true)]
        interfaces: Vec<String>,
        #[arg(long, value_enum, default_value = "native")]
        xdp_mode: Mode,
    },
}

fn main() -> ExitCode {
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
        Command::Agent { config, socket } => agent::run(&config, &socket).await,
        Command::Check { config } => {
            let c =
                Config::load(&config).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            println!(
                "{}: {} services, {} servers: ok",
                config.display(),
                c.services.len(),
                c.services.iter().map(|s| s.servers.len()).sum::<usize>()
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
        } => {
            server::run(server::ServerOptions {
                interfaces,
                anycast,
                xdp_mode: xdp_mode.into(),
            })
            .await
        }
        Command::Passthrough {
            interfaces,
            xdp_mode,
        } => server::passthrough(&interfaces, xdp_mode.into()).await,
    }
}
