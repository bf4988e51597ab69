//! `fedshield-host`: the host aggregator's single binary.

use clap::{Parser, Subcommand};
use fedshield_host::broker::{DEFAULT_MAX_PACKET_BYTES, EmbeddedBroker};
use std::net::SocketAddr;

#[derive(Parser)]
#[command(name = "fedshield-host", version, about = "FedShield host aggregator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded MQTT broker alone (for a one-machine fleet or a test rig).
    Broker {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: SocketAddr,
        /// Largest MQTT packet accepted, in bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_PACKET_BYTES)]
        max_packet_bytes: usize,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Broker {
            listen,
            max_packet_bytes,
        } => {
            let broker = EmbeddedBroker::start(listen, max_packet_bytes)?;
            println!(
                "embedded MQTT broker listening on {}; Ctrl-C stops it",
                broker.addr()
            );
            loop {
                std::thread::park();
            }
        }
    }
}
