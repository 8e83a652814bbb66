//! The built-in HAP agent: a JSON-RPC 2.0 server on a line stream (stdin/stdout when run as a child
//! process, `tokio::io::duplex` in tests), answering the way haive-hap 1.0.1's `HAPServer` does in
//! `../shared/protocols/data/hap/observed-stdio-exchange.jsonl`: compact JSON lines, `tools/list`,
//! `tools/call`, `resources/list`, `resources/read hap://server/info`, `prompts/list`, `prompts/get`,
//! −32601 "Unknown method" for an unhandled method under an allowed prefix, −32603 for the rest,
//! −32700 with `"id":"unknown"` for a line that is not JSON. With `seed_methods` it also answers the
//! documented `agent/list`, `agent/describe` and `agent/execute` (which 1.0.1 rejects).
//!
//! One tool (`ask`, argument `text`): every call is a slow "lookup" that sends `progress`
//! notifications (and one `log`) before its answer, "You said: <text>." plus one sentence.
//!
//! Strict: a request that is not JSON-RPC 2.0 (no `"jsonrpc":"2.0"`, no `id`, a batch, extra keys,
//! non-object params), a non-integer or repeated id, or a method it does not answer is recorded in
//! the shared [`AgentLog`]. Test hooks: exit in the middle of a call, a garbage line before each
//! answer, answers out of order, an error object for every call.
//!
//! Context: tokio; requests are handled one at a time on the calling task.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// The method prefixes haive-hap's request validator accepts.
const ALLOWED_PREFIXES: &[&str] = &[
    "agents/",
    "graphs/",
    "tools/",
    "resources/",
    "prompts/",
    "schemas/",
    "engines/",
];

/// Longest request line read; a longer one is a violation and skipped.
const MAX_LINE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The server name (`hap://server/info` `name`) and agent name (`agent/list`).
    pub name: String,
    /// The tool each turn calls.
    pub tool: String,
    /// How long the lookup of each call runs; 0: no progress, answer at once.
    pub lookup_ms: u64,
    /// `progress` notifications per lookup (the first says `started`, the last `completed`).
    pub progress_steps: u32,
    /// The sentence after "You said: <text>.".
    pub closing: String,
    /// Also answer the documented `agent/list`, `agent/describe`, `agent/execute`.
    pub seed_methods: bool,
    /// Test hook: at the n-th call (1-based), stop without answering (the process exits).
    pub exit_on_call: Option<u32>,
    /// Test hook: a line that is not JSON before each call's answer.
    pub garbage_before_answer: bool,
    /// Test hook: each answer waits for the next request, which is answered first (or goes after
    /// `out_of_order_wait_ms` with nothing new).
    pub out_of_order: bool,
    pub out_of_order_wait_ms: u64,
    /// Test hook: every call is answered with this error object (code, message).
    pub error_on_call: Option<(i64, String)>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            name: "hearken-hap".into(),
            tool: "ask".into(),
            lookup_ms: 300,
            progress_steps: 3,
            closing: "I looked it up, and that is all I found.".into(),
            seed_methods: false,
            exit_on_call: None,
            garbage_before_answer: false,
            out_of_order: false,
            out_of_order_wait_ms: 200,
            error_on_call: None,
        }
    }
}

/// The answer to one user turn.
pub fn reply(text: &str, closing: &str) -> String {
    let said = text.trim().trim_end_matches(['.', '!', '?']);
    format!("You said: {said}. {closing}")
}

/// What the agent saw, shared with tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStats {
    /// Lines read (requests, garbage included).
    pub lines: u64,
    /// The method of every request, in order.
    pub methods: Vec<String>,
    /// The text of every call (tool or `agent/execute`).
    pub inputs: Vec<String>,
    /// Calls answered.
    pub calls_answered: u64,
    /// Protocol violations by the client.
    pub violations: Vec<String>,
}

#[derive(Clone, Default)]
pub struct AgentLog(Arc<Mutex<AgentStats>>);

impl AgentLog {
    fn lock(&self) -> MutexGuard<'_, AgentStats> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> AgentStats {
        self.lock().clone()
    }

    fn update(&self, f: impl FnOnce(&mut AgentStats)) {
        f(&mut self.lock());
    }

    fn violation(&self, what: String) {
        tracing::warn!(%what, "HAP violation by the client");
        self.update(|s| s.violations.push(what));
    }
}

impl fmt::Debug for AgentLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.lock().fmt(f)
    }
}

/// How [`serve_stdio`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The client closed our stdin.
    Eof,
    /// The `exit_on_call` hook fired: the process should exit now (non-zero), mid-call.
    ExitRequested,
}

/// Serves HAP on a line stream until it ends.
pub async fn serve_stdio<R, W>(
    stdin: R,
    stdout: W,
    settings: AgentSettings,
) -> std::io::Result<Served>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    serve_stdio_with_log(stdin, stdout, settings, AgentLog::default()).await
}

/// [`serve_stdio`] recording into `log`.
pub async fn serve_stdio_with_log<R, W>(
    stdin: R,
    stdout: W,
    settings: AgentSettings,
    log: AgentLog,
) -> std::io::Result<Served>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut server = Server {
        settings,
        log,
        out: stdout,
        seen_ids: HashSet::new(),
        calls: 0,
        held: None,
    };
    let mut reader = BufReader::new(stdin);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = if server.held.is_some() {
            let wait = Duration::from_millis(server.settings.out_of_order_wait_ms);
            match tokio::time::timeout(wait, read_line(&mut reader, &mut line)).await {
                Ok(r) => r?,
                Err(_) => {
                    server.release_held().await?;
                    continue;
                }
            }
        } else {
            read_line(&mut reader, &mut line).await?
        };
        match read {
            ReadLine::Eof => {
                server.release_held().await?;
                server.out.flush().await?;
                return Ok(Served::Eof);
            }
            ReadLine::TooLong => {
                server.log.violation("a request line over 1 MiB".into());
                continue;
            }
            ReadLine::Line => {}
        }
        let text = String::from_utf8_lossy(&line).trim().to_string();
        if text.is_empty() {
            continue;
        }
        server.log.update(|s| s.lines += 1);
        if server.handle(&text).await? == Flow::Exit {
            return Ok(Served::ExitRequested);
        }
    }
}

enum ReadLine {
    Line,
    TooLong,
    Eof,
}

async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> std::io::Result<ReadLine> {
    let mut too_long = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() && !too_long {
                ReadLine::Eof
            } else if too_long {
                ReadLine::TooLong
            } else {
                ReadLine::Line
            });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if !too_long {
            line.extend_from_slice(&buf[..take]);
            if line.len() > MAX_LINE_BYTES {
                too_long = true;
                line.clear();
            }
        }
        r.consume(take);
        if done {
            return Ok(if too_long {
                ReadLine::TooLong
            } else {
                ReadLine::Line
            });
        }
    }
}

#[derive(PartialEq)]
enum Flow {
    Go,
    Exit,
}

struct Server<W> {
    settings: AgentSettings,
    log: AgentLog,
    out: W,
    seen_ids: HashSet<String>,
    calls: u32,
    /// `out_of_order`: an answer waiting for the next request.
    held: Option<Value>,
}

fn error(id: &Value, code: i64, message: &str, data_type: Option<&str>) -> Value {
    let mut e = json!({"code": code, "message": message});
    if let Some(t) = data_type {
        e["data"] = json!({"type": t});
    }
    json!({"jsonrpc": "2.0", "id": id, "error": e})
}

fn result(id: &Value, r: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": r})
}

impl<W: AsyncWrite + Unpin> Server<W> {
    async fn write(&mut self, v: &Value) -> std::io::Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        self.out.write_all(line.as_bytes()).await?;
        self.out.flush().await
    }

    async fn release_held(&mut self) -> std::io::Result<()> {
        if let Some(v) = self.held.take() {
            self.write(&v).await?;
        }
        Ok(())
    }

    /// An answer to a request: held back under `out_of_order`, after any answer already held.
    async fn answer(&mut self, v: Value, is_call: bool) -> std::io::Result<()> {
        if self.settings.out_of_order {
            match self.held.take() {
                Some(older) => {
                    self.write(&v).await?;
                    self.write(&older).await?;
                }
                // Nothing older: this one waits for the next request.
                None if is_call => self.held = Some(v),
                None => self.write(&v).await?,
            }
            return Ok(());
        }
        self.write(&v).await
    }

    async fn handle(&mut self, text: &str) -> std::io::Result<Flow> {
        let unknown = Value::from("unknown");
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.log.violation(format!("not JSON: {text:.80}"));
                let msg = format!("Parse error: {e}");
                self.write(&error(&unknown, -32700, &msg, None)).await?;
                return Ok(Flow::Go);
            }
        };
        let Some(obj) = v.as_object() else {
            let what = if v.is_array() {
                "a batch"
            } else {
                "not an object"
            };
            self.log.violation(format!("{what}: {text:.80}"));
            let msg = format!(
                "Internal error: '{}' object has no attribute 'get'",
                if v.is_array() { "list" } else { "str" }
            );
            self.write(&error(&unknown, -32603, &msg, None)).await?;
            return Ok(Flow::Go);
        };
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            self.log
                .violation(format!("not \"jsonrpc\":\"2.0\": {text:.80}"));
        }
        let Some(id) = obj.get("id").filter(|i| !i.is_null()).cloned() else {
            // haive-hap answers a notification with an error, contrary to JSON-RPC.
            self.log
                .violation(format!("a request without id: {text:.80}"));
            let msg = "Internal error: 1 validation error for HAPRequest\nid\n  Field required";
            self.write(&error(&unknown, -32603, msg, None)).await?;
            return Ok(Flow::Go);
        };
        if !id.is_u64() && !id.is_i64() {
            self.log.violation(format!("id {id} is not an integer"));
        }
        if !self.seen_ids.insert(id.to_string()) {
            self.log.violation(format!("id {id} used twice"));
        }
        let extra: Vec<&String> = obj
            .keys()
            .filter(|k| !matches!(k.as_str(), "jsonrpc" | "id" | "method" | "params"))
            .collect();
        if let Some(k) = extra.first() {
            self.log.violation(format!("extra top-level key {k:?}"));
            let msg = format!(
                "Internal error: 1 validation error for HAPRequest\n{k}\n  Extra inputs are not permitted"
            );
            self.write(&error(&id, -32603, &msg, None)).await?;
            return Ok(Flow::Go);
        }
        let method = obj
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        self.log.update(|s| s.methods.push(method.clone()));
        let params = match obj.get("params") {
            None => Value::Object(Map::new()),
            Some(p) if p.is_object() => p.clone(),
            Some(p) => {
                self.log.violation(format!("params not an object: {p}"));
                let msg = "Internal error: 1 validation error for HAPRequest\nparams\n  Input should be a valid dictionary";
                self.write(&error(&id, -32603, msg, None)).await?;
                return Ok(Flow::Go);
            }
        };
        let call_text = match method.as_str() {
            "tools/call" => {
                let name = params.get("name").and_then(Value::as_str).unwrap_or("");
                if name != self.settings.tool {
                    let msg = format!("Tool not found: {name}");
                    self.log
                        .violation(format!("tools/call of unknown tool {name:?}"));
                    self.answer(error(&id, -32603, &msg, Some("ValueError")), false)
                        .await?;
                    return Ok(Flow::Go);
                }
                match params.pointer("/arguments/text").and_then(Value::as_str) {
                    Some(t) => t.to_string(),
                    None => {
                        self.log
                            .violation(format!("tools/call without text: {params}"));
                        let msg = format!(
                            "Invalid arguments: 1 validation error for {}_Input\ntext\n  Field required",
                            self.settings.tool
                        );
                        self.answer(error(&id, -32603, &msg, Some("ValueError")), false)
                            .await?;
                        return Ok(Flow::Go);
                    }
                }
            }
            "agent/execute" if self.settings.seed_methods => {
                let agent = params.get("agent").and_then(Value::as_str).unwrap_or("");
                if agent != self.settings.name {
                    self.log
                        .violation(format!("agent/execute of unknown agent {agent:?}"));
                    let msg = format!("Agent not found: {agent}");
                    self.answer(error(&id, -32001, &msg, None), false).await?;
                    return Ok(Flow::Go);
                }
                match params.pointer("/input/text").and_then(Value::as_str) {
                    Some(t) => t.to_string(),
                    None => {
                        self.log
                            .violation(format!("agent/execute without input.text: {params}"));
                        let msg = "Invalid params: input.text is required";
                        self.answer(error(&id, -32602, msg, None), false).await?;
                        return Ok(Flow::Go);
                    }
                }
            }
            _ => {
                let v = self.simple(&id, &method, &params);
                self.answer(v, false).await?;
                return Ok(Flow::Go);
            }
        };
        self.call(id, &method, call_text).await
    }

    /// Everything but a call: answered at once.
    fn simple(&mut self, id: &Value, method: &str, params: &Value) -> Value {
        let s = &self.settings;
        match method {
            "tools/list" => result(
                id,
                json!([{
                    "name": s.tool,
                    "description": "Answer what the user said (after a short lookup).",
                    "input_schema": {
                        "properties": {"text": {"title": "Text", "type": "string"}},
                        "required": ["text"],
                        "title": format!("{}_Input", s.tool),
                        "type": "object"
                    }
                }]),
            ),
            "resources/list" => result(
                id,
                json!([{"uri": "hap://server/info", "name": "server_info", "description": "Server information", "mime_type": "application/json"}]),
            ),
            "resources/read" => match params.get("uri").and_then(Value::as_str) {
                Some("hap://server/info") => result(
                    id,
                    json!({
                        "name": s.name,
                        "description": "hearken's built-in HAP agent",
                        "version": "1.0.0",
                        "type": "HAPServer",
                        "created_at": "2026-01-01T00:00:00",
                        "capabilities": ["tools", "resources"],
                        "stats": {"tools": 1, "resources": 1, "prompts": 0}
                    }),
                ),
                other => {
                    let uri = other.unwrap_or("");
                    self.log
                        .violation(format!("resources/read of unknown {uri:?}"));
                    error(
                        id,
                        -32603,
                        &format!("Resource not found: {uri}"),
                        Some("ValueError"),
                    )
                }
            },
            "prompts/list" => result(id, json!([])),
            "prompts/get" => {
                let name = params.get("name").and_then(Value::as_str).unwrap_or("");
                self.log
                    .violation(format!("prompts/get of unknown {name:?}"));
                error(
                    id,
                    -32603,
                    &format!("Prompt not found: {name}"),
                    Some("ValueError"),
                )
            }
            "agent/list" if s.seed_methods => result(
                id,
                json!([{"name": s.name, "description": "Answers what the user said"}]),
            ),
            "agent/describe" if s.seed_methods => {
                let agent = params.get("agent").and_then(Value::as_str).unwrap_or("");
                if agent == s.name {
                    result(
                        id,
                        json!({"name": s.name, "description": "Answers what the user said", "type": "EchoAgent", "capabilities": ["progress"], "tools": [s.tool]}),
                    )
                } else {
                    self.log
                        .violation(format!("agent/describe of unknown agent {agent:?}"));
                    error(id, -32001, &format!("Agent not found: {agent}"), None)
                }
            }
            m if ALLOWED_PREFIXES.iter().any(|p| m.starts_with(p)) => {
                self.log.violation(format!("unknown method {m:?}"));
                error(id, -32601, &format!("Unknown method: {m}"), None)
            }
            m => {
                self.log.violation(format!("unknown method {m:?}"));
                let msg = format!(
                    "Internal error: 1 validation error for HAPRequest\nmethod\n  Value error, Method must start with one of: {} [type=value_error, input_value='{m}', input_type=str]",
                    ALLOWED_PREFIXES.join(", ")
                );
                error(id, -32603, &msg, None)
            }
        }
    }

    /// One call: log, progress through the lookup, then the answer.
    async fn call(&mut self, id: Value, method: &str, text: String) -> std::io::Result<Flow> {
        self.calls += 1;
        self.log.update(|s| s.inputs.push(text.clone()));
        if self.settings.exit_on_call == Some(self.calls) {
            tracing::info!(calls = self.calls, "HAP agent exits mid-call (test hook)");
            self.out.flush().await?;
            return Ok(Flow::Exit);
        }
        let log = json!({"jsonrpc": "2.0", "method": "log", "params": {
            "timestamp": "2026-01-01T00:00:00", "level": "info",
            "message": format!("Starting execution of {}", self.settings.tool), "request_id": id}});
        self.write(&log).await?;
        let steps = self.settings.progress_steps.max(1);
        if self.settings.lookup_ms > 0 {
            let pause = Duration::from_millis(self.settings.lookup_ms / u64::from(steps));
            for current in 0..=steps {
                let state = match current {
                    0 => "started",
                    c if c == steps => "completed",
                    _ => "in_progress",
                };
                let p = json!({"jsonrpc": "2.0", "method": "progress", "params": {
                    "request_id": id, "current": current, "total": steps,
                    "message": "Looking that up", "state": state}});
                self.write(&p).await?;
                if current < steps {
                    tokio::time::sleep(pause).await;
                }
            }
        }
        if self.settings.garbage_before_answer {
            self.write_raw("garbage: this line is not JSON {").await?;
        }
        let answer = match &self.settings.error_on_call {
            Some((code, message)) => error(&id, *code, message, Some("AgentError")),
            None => {
                let said = reply(&text, &self.settings.closing);
                if method == "agent/execute" {
                    result(
                        &id,
                        json!({"output": said, "metadata": {"agent": self.settings.name}}),
                    )
                } else {
                    result(&id, Value::from(said))
                }
            }
        };
        self.answer(answer, true).await?;
        self.log.update(|s| s.calls_answered += 1);
        Ok(Flow::Go)
    }

    async fn write_raw(&mut self, line: &str) -> std::io::Result<()> {
        self.out.write_all(line.as_bytes()).await?;
        self.out.write_all(b"\n").await?;
        self.out.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(
            reply(" what time is it? ", "Done."),
            "You said: what time is it. Done."
        );
    }
}
