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
//! - [`h2a`]: H2A v0.2 (Standard agent level) over HTTP: AgentCard, `POST /h2a/session` with an SSE
//!   answer, `POST /h2a/signal`.
//! - [`hap`]: HAP over a line stream (stdin/stdout as a child process, or any reader/writer
//!   pair): the JSON-RPC surface haive-hap 1.0.1 implements, optionally the documented `agent/*` ones.
//!
//! Context: tokio. Every connection runs in its own task; nothing here blocks.

pub mod arp;
pub mod h2a;
pub mod haip;
pub mod hap;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::cli::{AgentArgs, AgentProtocol};

/// An agent's shared, cloneable record of what happened (its `AgentStats`), read by tests and the demo.
pub struct SharedLog<S>(Arc<Mutex<S>>);

impl<S> Clone for SharedLog<S> {
    fn clone(&self) -> Self {
        SharedLog(self.0.clone())
    }
}

impl<S: Default> Default for SharedLog<S> {
    fn default() -> Self {
        SharedLog(Arc::new(Mutex::new(S::default())))
    }
}

impl<S: Default + Clone> SharedLog<S> {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, S> {
        // A panic elsewhere while holding the lock leaves plain counters: still worth reading.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut S)) {
        f(&mut self.lock());
    }

    /// A copy of the current stats.
    pub fn snapshot(&self) -> S {
        self.lock().clone()
    }

    /// Polls every 10 ms until `pred` holds or `timeout` passes; returns whether it held.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&S) -> bool) -> bool {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.lock()) {
                return true;
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for SharedLog<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.lock() {
            Ok(s) => s.fmt(f),
            Err(p) => p.get_ref().fmt(f),
        }
    }
}

/// A running built-in agent. Dropping it shuts the agent down.
pub struct AgentHandle<S> {
    addr: SocketAddr,
    url: String,
    log: SharedLog<S>,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl<S: Default + Clone> AgentHandle<S> {
    pub(crate) fn new(
        addr: SocketAddr,
        url: String,
        log: SharedLog<S>,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<io::Result<()>>,
    ) -> Self {
        AgentHandle {
            addr,
            url,
            log,
            shutdown,
            task: Some(task),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where devices connect.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn log(&self) -> &SharedLog<S> {
        &self.log
    }

    pub fn stats(&self) -> S {
        self.log.snapshot()
    }

    /// Closes every connection and waits for the server task.
    pub async fn shutdown(mut self) -> io::Result<()> {
        let _ = self.shutdown.send(true);
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl<S> Drop for AgentHandle<S> {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn wait_shutdown(mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// `hearken agent`: serve the chosen reference agent on `--listen` until SIGTERM or SIGINT.
pub fn run_cli(args: &AgentArgs) -> anyhow::Result<()> {
    let rt = crate::service::runtime()?;
    rt.block_on(async {
        let shutdown = crate::service::signal_shutdown();
        if args.protocol == AgentProtocol::Hap {
            // stdout is the protocol: nothing else may be printed there (the log goes to stderr).
            let served = tokio::select! {
                r = hap::serve_stdio(tokio::io::stdin(), tokio::io::stdout(), hap::AgentSettings {
                    exit_on_call: args.exit_on_call,
                    ..hap::AgentSettings::default()
                }) => r?,
                _ = wait_shutdown(shutdown) => return Ok(()),
            };
            if served == hap::Served::ExitRequested {
                anyhow::bail!("exiting mid-call (test hook)");
            }
            return Ok(());
        }
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
            AgentProtocol::H2a => {
                let settings = h2a::AgentSettings {
                    token: args.token.clone(),
                    ..h2a::AgentSettings::default()
                };
                println!(
                    "H2A agent on http://{}{}",
                    listener.local_addr()?,
                    if settings.token.is_some() {
                        " (bearer token required)"
                    } else {
                        ""
                    }
                );
                h2a::serve(listener, settings, shutdown).await?;
            }
            AgentProtocol::Hap => unreachable!("served on stdio above"),
        }
        Ok(())
    })
}
