//! Child-process transport: the agent is a program (on the device, or behind `ssh host cmd`) that
//! reads one JSON message per line on its stdin and writes one per line on its stdout (NDJSON, what
//! haive-hap's `StdioTransport` speaks). Each line is one [`Wire::Text`].
//!
//! - The child is killed when the connection is dropped (`kill_on_drop`); [`StdioConnection::close`]
//!   closes its stdin first and gives it a second to exit.
//! - Lines longer than `max_line_bytes` end the connection with [`TransportError::TooLarge`]: at most
//!   one line plus one read chunk is ever buffered, so a runaway child cannot exhaust memory.
//! - Lines that are not JSON (or not UTF-8, read lossily) are passed up as `Wire::Text` all the same:
//!   the codec rejects and counts them. Blank lines are skipped.
//! - stderr is drained by a small task (else a chatty child blocks on a full pipe): every line is
//!   logged (target `hearken::agent_stderr`) and the last [`STDERR_TAIL_LINES`] are kept, so when the
//!   child exits, `recv` returns [`TransportError::Exited`] with the exit status and that tail.
//! - A running child counts as alive ([`AgentConnection::last_rx`] is "now"): HAP has no keepalive, an
//!   exit is reported by `recv`, and a hung agent is caught by the codec's request timeout.
//!
//! Context: tokio (the link task). `recv` is cancel-safe: partial lines live in the connection, and
//! every await in it (a read into a local chunk, the child's exit) loses nothing when dropped. `send`
//! is not (a cancelled send may have written part of a line: drop the connection then).

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::{AgentConnection, TransportError, TransportFuture};
use crate::protocol::Wire;

/// Default for [`StdioSettings::max_line_bytes`].
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// stderr lines kept for the error message when the child exits.
pub const STDERR_TAIL_LINES: usize = 10;

/// Longest stderr line kept (the rest of the line is dropped).
const STDERR_LINE_CHARS: usize = 300;

/// After stdout closes, how long to wait for the exit status before killing the child.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// How long [`StdioConnection::close`] gives the child to exit after its stdin closes.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

const READ_CHUNK: usize = 8 * 1024;

#[derive(Debug, Clone)]
pub struct StdioSettings {
    /// The program and its arguments (no shell: use `["sh", "-c", "..."]` for one).
    pub argv: Vec<String>,
    /// Longest line accepted from the child.
    pub max_line_bytes: usize,
}

impl StdioSettings {
    pub fn new(argv: &[String]) -> Self {
        StdioSettings {
            argv: argv.to_vec(),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

/// The last lines of the child's stderr.
#[derive(Debug, Clone, Default)]
struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back(line);
        while q.len() > STDERR_TAIL_LINES {
            q.pop_front();
        }
    }

    fn joined(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect::<Vec<_>>().join(" | ")
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// One running agent process (or, for tests and in-process agents, any byte stream pair).
pub struct StdioConnection {
    reader: Reader,
    writer: Option<Writer>,
    child: Option<Child>,
    program: String,
    buf: Vec<u8>,
    max_line_bytes: usize,
    eof: bool,
    done: bool,
    stderr: StderrTail,
    stderr_task: Option<JoinHandle<()>>,
    last_rx: Instant,
}

impl std::fmt::Debug for StdioConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdioConnection")
            .field("program", &self.program)
            .field("pid", &self.child.as_ref().and_then(Child::id))
            .field("done", &self.done)
            .finish()
    }
}

/// Starts `argv` with piped stdin, stdout and stderr.
/// Whether `program` names a file (with a `/`) or a file in a `$PATH` directory, as exec finds it.
/// Also used by the command speech backend.
pub fn program_exists(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).is_file();
    }
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| !program.is_empty() && dir.join(program).is_file())
    })
}

pub async fn connect(argv: &[String]) -> Result<StdioConnection, TransportError> {
    connect_with(&StdioSettings::new(argv)).await
}

pub async fn connect_with(s: &StdioSettings) -> Result<StdioConnection, TransportError> {
    let Some((program, args)) = s.argv.split_first() else {
        return Err(TransportError::Spawn {
            program: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "the command is empty"),
        });
    };
    // Looked up first, as the exec would: under an emulator (qemu-user) a failed exec is not
    // reported by `spawn`, the child just exits with 127.
    if !program_exists(program) {
        return Err(TransportError::Spawn {
            program: program.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file, nor on PATH"),
        });
    }
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| TransportError::Spawn {
            program: program.clone(),
            source,
        })?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(TransportError::Io("the child's pipes are missing".into()));
    };
    let tail = StderrTail::default();
    let task = tokio::spawn(drain_stderr(stderr, tail.clone(), program.clone()));
    tracing::info!(program = %program, pid = ?child.id(), "agent process started");
    let mut conn = StdioConnection::from_streams(stdout, stdin, s.max_line_bytes);
    conn.child = Some(child);
    conn.program = program.clone();
    conn.stderr = tail;
    conn.stderr_task = Some(task);
    Ok(conn)
}

async fn drain_stderr(mut stderr: impl AsyncRead + Unpin, tail: StderrTail, program: String) {
    let mut line: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 1024];
    let flush = |line: &mut Vec<u8>| {
        let text = String::from_utf8_lossy(line).trim_end().to_string();
        line.clear();
        if !text.is_empty() {
            tracing::info!(target: "hearken::agent_stderr", program = %program, "{text}");
            tail.push(text);
        }
    };
    loop {
        let n = match stderr.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &chunk[..n] {
            if b == b'\n' {
                flush(&mut line);
            } else if line.len() < STDERR_LINE_CHARS {
                line.push(b);
            }
        }
    }
    flush(&mut line);
}

impl StdioConnection {
    /// NDJSON over any reader/writer pair (an in-process agent over `tokio::io::duplex`, a socket).
    /// The end of `reader` is a close (`recv` gives `None`), not an error.
    pub fn from_streams(
        reader: impl AsyncRead + Send + Unpin + 'static,
        writer: impl AsyncWrite + Send + Unpin + 'static,
        max_line_bytes: usize,
    ) -> Self {
        StdioConnection {
            reader: Box::new(reader),
            writer: Some(Box::new(writer)),
            child: None,
            program: String::new(),
            buf: Vec::new(),
            max_line_bytes: max_line_bytes.max(1),
            eof: false,
            done: false,
            stderr: StderrTail::default(),
            stderr_task: None,
            last_rx: Instant::now(),
        }
    }

    /// The child's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The last stderr lines so far, joined with `" | "`.
    pub fn stderr_tail(&self) -> String {
        self.stderr.joined()
    }

    /// The next complete line in the buffer, if any.
    fn take_line(&mut self) -> Option<Result<String, TransportError>> {
        loop {
            let pos = self.buf.iter().position(|&b| b == b'\n')?;
            if pos > self.max_line_bytes {
                return Some(Err(self.too_large()));
            }
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Ok(String::from_utf8(line).unwrap_or_else(|e| {
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            })));
        }
    }

    fn too_large(&mut self) -> TransportError {
        self.done = true;
        self.buf = Vec::new();
        tracing::warn!(
            limit = self.max_line_bytes,
            "agent sent a line over the limit"
        );
        TransportError::TooLarge {
            limit: self.max_line_bytes,
        }
    }

    /// stdout ended: the exit status and stderr tail (a child), or a plain close (streams).
    async fn ended(&mut self) -> Option<TransportError> {
        let child = self.child.as_mut()?;
        let status = match tokio::time::timeout(EXIT_WAIT, child.wait()).await {
            Ok(Ok(st)) => format!("{:?} exited ({st})", self.program),
            Ok(Err(e)) => format!(
                "{:?} closed its stdout (exit status unknown: {e})",
                self.program
            ),
            Err(_) => {
                let _ = child.start_kill();
                format!(
                    "{:?} closed its stdout but kept running (killed)",
                    self.program
                )
            }
        };
        // The last stderr lines are usually why.
        if let Some(task) = self.stderr_task.as_mut() {
            let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
        }
        self.stderr_task = None;
        let stderr = self.stderr.joined();
        tracing::warn!(%status, %stderr, "agent process ended");
        Some(TransportError::Exited { status, stderr })
    }

    async fn recv_line(&mut self) -> Option<Result<Wire, TransportError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(line) = self.take_line() {
                return Some(line.map(Wire::Text));
            }
            if self.buf.len() > self.max_line_bytes {
                return Some(Err(self.too_large()));
            }
            if self.eof {
                if !self.buf.is_empty() {
                    // A last line without its newline.
                    self.buf.push(b'\n');
                    continue;
                }
                let end = self.ended().await;
                self.done = true;
                return end.map(Err);
            }
            let mut chunk = [0u8; READ_CHUNK];
            match self.reader.read(&mut chunk).await {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.last_rx = Instant::now();
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(TransportError::Io(format!(
                        "reading from the agent process: {e}"
                    ))));
                }
            }
        }
    }

    async fn send_line(&mut self, frame: Wire) -> Result<(), TransportError> {
        let Wire::Text(text) = frame else {
            return Err(TransportError::Io(
                "the stdio transport carries text lines only".into(),
            ));
        };
        let text = text.trim_end_matches(['\r', '\n']);
        if text.contains('\n') {
            return Err(TransportError::Io(
                "a frame with a newline inside cannot go as one line".into(),
            ));
        }
        let Some(w) = self.writer.as_mut() else {
            return Err(TransportError::Closed {
                code: 1000,
                reason: "the agent's stdin is closed".into(),
            });
        };
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        let r = async {
            w.write_all(&line).await?;
            w.flush().await
        }
        .await;
        r.map_err(|e| TransportError::Io(format!("writing to the agent process: {e}")))
    }

    async fn shutdown(&mut self) {
        // EOF on its stdin is the polite way to ask a line-reading agent to stop.
        if let Some(mut w) = self.writer.take() {
            let _ = w.shutdown().await;
        }
        if let Some(child) = self.child.as_mut() {
            if tokio::time::timeout(CLOSE_WAIT, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            tracing::info!(program = %self.program, "agent process stopped");
        }
        self.done = true;
    }
}

impl AgentConnection for StdioConnection {
    fn send(&mut self, frame: Wire) -> TransportFuture<'_, Result<(), TransportError>> {
        Box::pin(self.send_line(frame))
    }

    fn recv(&mut self) -> TransportFuture<'_, Option<Result<Wire, TransportError>>> {
        Box::pin(self.recv_line())
    }

    fn ping(&mut self) -> TransportFuture<'_, ()> {
        // Lines have no keepalive; the process is alive until `recv` says otherwise.
        Box::pin(async {})
    }

    fn close(&mut self) -> TransportFuture<'_, ()> {
        Box::pin(self.shutdown())
    }

    fn last_rx(&self) -> Instant {
        if self.done {
            self.last_rx
        } else {
            Instant::now()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_looked_up_like_exec_does() {
        assert!(program_exists("sh"), "sh on PATH");
        assert!(program_exists("/bin/sh"));
        assert!(!program_exists("hearken-no-such-program"));
        assert!(!program_exists("/nonexistent/sh"));
        assert!(!program_exists("/bin"), "a directory is not a program");
        assert!(!program_exists(""));
    }
}
