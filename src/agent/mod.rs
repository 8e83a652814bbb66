//! Built-in reference agents: the server side of each protocol the device speaks, for `hearken demo`,
//! `hearken agent` and the integration tests.
//!
//! Each agent is spec-correct and strict: it rejects what its spec forbids, records every protocol
//! violation it sees in a shared log, and answers each user turn with a small, predictable reply
//! (text naming what it heard, the user's own audio played back, a short tone). Tests assert on that
//! log that the device never broke the protocol. Test hooks inject the faults a real network or agent
//! produces (lost and duplicated frames, a connection dropped mid-turn, an ignored cancel).
//!
//! - [`haip`]: HAIP 1.1.2 (`haiprotocol/haip@f8dfe4d`) over WebSocket, optionally behind TLS.
//! - [`arp`]: ARP v1 Minimal Mode (arp-go `b36d884`) at `/_arp/v1`.
//! - [`hap`]: HAP over a line stream (stdin/stdout as a child process, or any reader/writer
//!   pair): the JSON-RPC surface haive-hap 1.0.1 implements, optionally the documented `agent/*` ones.
//!
//! Context: tokio. Every connection runs in its own task; nothing here blocks.

pub mod arp;
pub mod haip;
pub mod hap;

use anyhow::Context as _;

use crate::cli::{AgentArgs, AgentProtocol};

/// `hearken agent`: serve the chosen reference agent on `--listen` until SIGTERM or SIGINT.
pub fn run_cli(args: &AgentArgs) -> anyhow::Result<()> {
    let rt = crate::service::runtime()?;
    rt.block_on(async {
        let shutdown = crate::service::signal_shutdown();
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        match args.protocol {
            AgentProtocol::Haip => {
                let settings = haip::AgentSettings {
                    token: args.token.clone(),
                    ..haip::AgentSettings::default()
                };
                println!(
                    "HAIP {} agent on ws://{}/haip/websocket{}",
                    haip::HAIP_VERSION,
                    listener.local_addr()?,
                    if settings.token.is_some() {
                        " (token required)"
                    } else {
                        ""
                    }
                );
                haip::serve(listener, settings, None, shutdown).await?;
            }
            AgentProtocol::Arp => {
                if args.token.is_some() {
                    // ARP defines no authentication; a fronting proxy would check a token.
                    anyhow::bail!("--token: ARP has no authentication (put a proxy in front)");
                }
                println!(
                    "ARP v1 Minimal Mode agent on ws://{}{}",
                    listener.local_addr()?,
                    crate::protocol::arp::ARP_PATH
                );
                arp::serve(listener, arp::AgentSettings::default(), shutdown).await?;
            }
        }
        Ok(())
    })
}
