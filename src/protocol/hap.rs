//! HAP (Haive Agent Protocol, haive-hap 1.0.1), client side: JSON-RPC 2.0 requests, one JSON message
//! per frame (a line on stdio, a POST body over HTTP). See `../shared/protocols/hap.md`.
//!
//! - Every request carries `"jsonrpc":"2.0"`, an integer `id` (from 1 per connection) and an object
//!   `params`; nothing is batched and no notification is ever sent. Responses are matched by `id`, in
//!   any order.
//! - HAP has no handshake: `open` discovers the agent. One compatibility layer covers two surfaces
//!   ([`Surface`]): the methods haive-hap 1.0.1 implements (`tools/list`, `tools/call`,
//!   `resources/read hap://server/info`), and the documented seed methods (`agent/list`,
//!   `agent/describe`, `agent/execute`), which 1.0.1 rejects with −32603. [`Surface::Auto`] asks
//!   `tools/list` first and falls back to `agent/list`. [`Downlink::Ready`] follows discovery.
//! - Each user turn (`Uplink::Text`) is one call: `tools/call` of the chosen tool (AgentServer's
//!   `execute` gets `{"input_data":{"text":…}}`, any other tool its first string argument) or
//!   `agent/execute {"agent", "input":{"text"}}`. One turn at a time; a second waits for the first.
//! - The result becomes `ResponseStarted`, `TextDelta` + `TextDone` (the result as text),
//!   `ResponseFinished`; an error object becomes `Downlink::Error` with the code and the message
//!   verbatim (plus `data.type`), then `ResponseFinished{Error}`. `progress` notifications (the shape
//!   the digest sketches) become `Tool{Started}` then `Tool{Progress}`; `log` and `state` are logged.
//! - No cancel exists: a barge-in drops the pending call; its late response (and progress) is
//!   discarded and counted in [`CodecStats::cancelled_run_frames_dropped`].
//! - A call without an answer within `request_timeout_ms` ends as an error (a discovery call as a
//!   fatal one: the link then starts the agent again), through `poll`/`take_events`.
//! - Decoding is lenient: non-JSON is [`ProtocolError::Malformed`]; a response with no usable or an
//!   unknown `id`, a server request, an unknown notification become [`Downlink::Unknown`] with a reason.
//!
//! Context: the link task; sans-IO, never blocks.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use super::{
    CodecStats, Decoded, Downlink, FinishStatus, Protocol, ProtocolError, SessionInfo, ToolState,
    Uplink, Wire,
};

/// Default for [`HapSettings::request_timeout_ms`].
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;

/// The resource every haive-hap server has.
pub const SERVER_INFO_URI: &str = "hap://server/info";

/// How many dropped (cancelled or timed-out) call ids are remembered for their late answers.
const CANCELLED_MEMORY: usize = 64;

/// Which method family the agent is spoken to with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Surface {
    /// `tools/list` first; `agent/list` if that fails.
    #[default]
    Auto,
    /// haive-hap 1.0.1's implemented methods only.
    Tools,
    /// The documented `agent/*` methods only.
    Agent,
}

#[derive(Debug, Clone)]
pub struct HapSettings {
    pub surface: Surface,
    /// The agent to run: `agent/execute`'s `agent` (default: the first `agent/list` gives).
    pub agent: Option<String>,
    /// Tools surface: the tool each turn calls (default: `execute` if offered, else the only tool, else
    /// the first tool with a string argument).
    pub tool: Option<String>,
    /// A call with no answer by then ends as an error.
    pub request_timeout_ms: u64,
}

impl Default for HapSettings {
    fn default() -> Self {
        HapSettings {
            surface: Surface::Auto,
            agent: None,
            tool: None,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
        }
    }
}

/// What a turn calls once discovery is done.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    /// `tools/call name` with `{arg: text}`, or AgentServer's `execute` with `{"input_data":{"text"}}`.
    Tool { name: String, arg: Option<String> },
    /// `agent/execute {"agent": name, ...}`.
    Agent { name: String },
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Tool { name, .. } | Target::Agent { name } => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Call {
    ToolsList,
    ServerInfo,
    AgentList,
    AgentDescribe,
    Execute,
}

#[derive(Debug)]
struct Pending {
    call: Call,
    method: &'static str,
    deadline_ms: u64,
}

#[derive(Debug)]
struct Turn {
    id: String,
    rpc_id: u64,
    started: bool,
    /// The `progress` tool activity is open.
    tool_open: bool,
}

#[derive(Debug, Default)]
struct Discovery {
    /// `tools/list` or `agent/list` settled the target (or failed: the reason).
    target: Option<Target>,
    tools_error: Option<String>,
    /// The server info came, failed or was not asked.
    info_done: bool,
    session: Option<String>,
    describe_pending: bool,
}

/// A HAP JSON-RPC client codec for one connection (one child process, one HTTP endpoint).
#[derive(Debug)]
pub struct HapClient {
    settings: HapSettings,
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    cancelled: VecDeque<u64>,
    discovery: Option<Discovery>,
    target: Option<Target>,
    session: Option<String>,
    turn: Option<Turn>,
    turns: u64,
    id_prefix: String,
    queue: VecDeque<String>,
    events: Vec<Downlink>,
    stats: CodecStats,
}

impl HapClient {
    pub fn new(settings: HapSettings) -> Self {
        HapClient {
            settings,
            next_id: 1,
            pending: BTreeMap::new(),
            cancelled: VecDeque::new(),
            discovery: None,
            target: None,
            session: None,
            turn: None,
            turns: 0,
            id_prefix: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            queue: VecDeque::new(),
            events: Vec::new(),
            stats: CodecStats::default(),
        }
    }

    /// Discovery is done: what each turn calls (`tools/call <tool>` or `agent/execute <agent>`).
    pub fn target(&self) -> Option<(&'static str, &str)> {
        self.target.as_ref().map(|t| match t {
            Target::Tool { name, .. } => ("tools/call", name.as_str()),
            Target::Agent { name } => ("agent/execute", name.as_str()),
        })
    }

    /// The session name `Ready` gave (the server's `name`, or the agent's).
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// A call is waiting for its answer.
    pub fn in_turn(&self) -> bool {
        self.turn.is_some()
    }

    /// Calls sent and not yet answered.
    pub fn pending_calls(&self) -> usize {
        self.pending.len()
    }

    fn request(&mut self, now_ms: u64, call: Call, method: &'static str, params: Value) -> Wire {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(
            id,
            Pending {
                call,
                method,
                deadline_ms: now_ms + self.settings.request_timeout_ms,
            },
        );
        // Envelope keys in the order haive-hap's own lines have them.
        Wire::Text(format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":{},\"params\":{params}}}",
            Value::from(method)
        ))
    }

    fn execute_frame(&mut self, now_ms: u64, text: String) -> Option<Wire> {
        let target = self.target.clone()?;
        let (method, params) = match &target {
            Target::Tool { name, arg: None } => (
                "tools/call",
                json!({"name": name, "arguments": {"input_data": {"text": text}}}),
            ),
            Target::Tool {
                name,
                arg: Some(arg),
            } => {
                let mut args = serde_json::Map::new();
                args.insert(arg.clone(), Value::from(text));
                ("tools/call", json!({"name": name, "arguments": args}))
            }
            Target::Agent { name } => (
                "agent/execute",
                json!({"agent": name, "input": {"text": text}}),
            ),
        };
        let rpc_id = self.next_id;
        let wire = self.request(now_ms, Call::Execute, method, params);
        self.turns += 1;
        self.turn = Some(Turn {
            id: format!("hap-{}-{}", self.id_prefix, self.turns),
            rpc_id,
            started: false,
            tool_open: false,
        });
        Some(wire)
    }

    /// The next queued turn, if the agent is ready and idle.
    fn next_turn(&mut self, now_ms: u64) -> Vec<Wire> {
        if self.turn.is_some() || self.target.is_none() {
            return Vec::new();
        }
        match self.queue.pop_front() {
            Some(text) => self.execute_frame(now_ms, text).into_iter().collect(),
            None => Vec::new(),
        }
    }

    fn forget(&mut self, rpc_id: u64) {
        self.pending.remove(&rpc_id);
        self.cancelled.push_back(rpc_id);
        while self.cancelled.len() > CANCELLED_MEMORY {
            self.cancelled.pop_front();
        }
    }

    fn started<'a>(turn: &'a mut Turn, out: &mut Vec<Downlink>) -> &'a mut Turn {
        if !turn.started {
            turn.started = true;
            out.push(Downlink::ResponseStarted {
                id: turn.id.clone(),
            });
        }
        turn
    }

    /// Ends the current turn: `text` is the answer, or `error` (code, message) what went wrong.
    fn finish_turn(&mut self, result: Result<String, (String, String)>, out: &mut Vec<Downlink>) {
        let Some(mut t) = self.turn.take() else {
            return;
        };
        let tool = self.target.as_ref().map(|t| t.name().to_string());
        Self::started(&mut t, out);
        if t.tool_open {
            out.push(Downlink::Tool {
                call_id: format!("{}-progress", t.id),
                name: tool.unwrap_or_default(),
                state: ToolState::Done,
            });
        }
        let status = match result {
            Ok(text) => {
                if !text.is_empty() {
                    out.push(Downlink::TextDelta {
                        message_id: t.id.clone(),
                        text,
                    });
                    out.push(Downlink::TextDone {
                        message_id: t.id.clone(),
                    });
                }
                FinishStatus::Ok
            }
            Err((code, message)) => {
                out.push(Downlink::Error {
                    code,
                    message,
                    fatal: false,
                });
                FinishStatus::Error
            }
        };
        out.push(Downlink::ResponseFinished { id: t.id, status });
    }

    /// Discovery failed for good: the session cannot go on.
    fn discovery_failed(&mut self, message: String, out: &mut Vec<Downlink>) {
        tracing::warn!(%message, "HAP discovery failed");
        self.discovery = None;
        self.pending.clear();
        out.push(Downlink::Error {
            code: "hap_discovery".into(),
            message,
            fatal: true,
        });
    }

    /// Ready once the target is known and the server info settled (asked only on the tools surface).
    fn maybe_ready(&mut self, out: &mut Vec<Downlink>) {
        let Some(d) = &self.discovery else { return };
        let (Some(target), true, false) = (&d.target, d.info_done, d.describe_pending) else {
            return;
        };
        let session = d
            .session
            .clone()
            .unwrap_or_else(|| target.name().to_string());
        tracing::info!(%session, target = ?target, "HAP agent ready");
        self.target = Some(target.clone());
        self.session = Some(session.clone());
        self.discovery = None;
        out.push(Downlink::Ready { session });
    }

    fn agent_list(&mut self, now_ms: u64) -> Wire {
        self.request(now_ms, Call::AgentList, "agent/list", json!({}))
    }

    /// A response for a call of ours. Returns frames to send next.
    fn on_response(
        &mut self,
        now_ms: u64,
        pending: Pending,
        rpc_id: u64,
        outcome: Result<Value, RpcError>,
        out: &mut Vec<Downlink>,
    ) -> Vec<Wire> {
        let mut wires = Vec::new();
        match pending.call {
            Call::Execute => {
                if self.turn.as_ref().map(|t| t.rpc_id) != Some(rpc_id) {
                    // Cannot happen (a new call only goes after the last one ended); be safe.
                    out.push(Downlink::Unknown {
                        kind: "response".into(),
                        reason: format!("answer {rpc_id} of no current turn"),
                    });
                    return wires;
                }
                let result = match outcome {
                    Ok(v) => result_text(&v).map_err(|m| ("execution_error".to_string(), m)),
                    Err(e) => Err((e.code.to_string(), e.describe())),
                };
                self.finish_turn(result, out);
                wires = self.next_turn(now_ms);
            }
            Call::ToolsList => {
                let Some(d) = self.discovery.as_mut() else {
                    return wires;
                };
                match outcome {
                    Ok(v) => match choose_tool(&v, self.settings.tool.as_deref()) {
                        Ok(target) => d.target = Some(target),
                        Err(why) => d.tools_error = Some(why),
                    },
                    Err(e) => d.tools_error = Some(format!("tools/list: {}", e.describe())),
                }
                if let Some(why) = d.tools_error.clone() {
                    if self.settings.surface == Surface::Auto {
                        tracing::info!(%why, "HAP tools surface unusable; trying agent/list");
                        wires.push(self.agent_list(now_ms));
                    } else {
                        self.discovery_failed(why, out);
                    }
                }
            }
            Call::ServerInfo => {
                if let Some(d) = self.discovery.as_mut() {
                    d.info_done = true;
                    match outcome {
                        Ok(v) => d.session = v.get("name").and_then(Value::as_str).map(Into::into),
                        Err(e) => tracing::debug!(error = %e.describe(), "no HAP server info"),
                    }
                }
            }
            Call::AgentList => {
                let Some(d) = self.discovery.as_mut() else {
                    return wires;
                };
                let tools_error = d.tools_error.take();
                match outcome
                    .map_err(|e| e.describe())
                    .and_then(|v| choose_agent(&v, self.settings.agent.as_deref()))
                {
                    Ok(name) => {
                        // The server info belongs to the tools surface; the agent names the session.
                        d.info_done = true;
                        d.session = Some(name.clone());
                        d.target = Some(Target::Agent { name: name.clone() });
                        d.describe_pending = true;
                        wires.push(self.request(
                            now_ms,
                            Call::AgentDescribe,
                            "agent/describe",
                            json!({"agent": name}),
                        ));
                    }
                    Err(why) => {
                        let message = match tools_error {
                            Some(t) => format!("no HAP surface answered: {t}; agent/list: {why}"),
                            None => format!("agent/list: {why}"),
                        };
                        self.discovery_failed(message, out);
                    }
                }
            }
            Call::AgentDescribe => {
                if let Some(d) = self.discovery.as_mut() {
                    d.describe_pending = false;
                    match outcome {
                        Ok(v) => tracing::info!(agent = %v, "HAP agent described"),
                        Err(e) => tracing::info!(error = %e.describe(), "agent/describe failed"),
                    }
                }
            }
        }
        self.maybe_ready(out);
        if self.target.is_some() && wires.is_empty() {
            wires = self.next_turn(now_ms);
        }
        wires
    }

    fn on_notification(&mut self, method: &str, params: &Value) -> Vec<Downlink> {
        let mut out = Vec::new();
        match method {
            "progress" => {
                // Which call: `request_id` (ours are integers; "N" and "req-N" are read too), else the
                // current turn.
                let rid = params.get("request_id").and_then(|r| match r {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.trim_start_matches("req-").parse().ok(),
                    _ => None,
                });
                if let Some(rid) = rid
                    && self.cancelled.contains(&rid)
                {
                    self.stats.cancelled_run_frames_dropped += 1;
                    return out;
                }
                let name = self
                    .target
                    .as_ref()
                    .map(|t| t.name().to_string())
                    .unwrap_or_default();
                match self.turn.as_mut() {
                    Some(t) if rid.is_none_or(|r| r == t.rpc_id) => {
                        let t = Self::started(t, &mut out);
                        let done = params.get("state").and_then(Value::as_str) == Some("completed");
                        let state = if !t.tool_open {
                            t.tool_open = true;
                            ToolState::Started
                        } else if done {
                            t.tool_open = false;
                            ToolState::Done
                        } else {
                            ToolState::Progress
                        };
                        tracing::debug!(progress = %params, "HAP progress");
                        out.push(Downlink::Tool {
                            call_id: format!("{}-progress", t.id),
                            name,
                            state,
                        });
                    }
                    _ => out.push(Downlink::Unknown {
                        kind: "progress".into(),
                        reason: "progress for no call in progress".into(),
                    }),
                }
            }
            "log" => {
                let message = params.get("message").and_then(Value::as_str).unwrap_or("");
                match params.get("level").and_then(Value::as_str) {
                    Some("error" | "warning") => tracing::warn!(%message, "HAP agent log"),
                    _ => tracing::debug!(%message, "HAP agent log"),
                }
            }
            "state" => tracing::debug!(state = %params, "HAP agent state"),
            other => out.push(Downlink::Unknown {
                kind: other.to_string(),
                reason: "HAP notification this client does not act on".into(),
            }),
        }
        out
    }

    fn malformed(&mut self, reason: String) -> ProtocolError {
        self.stats.malformed += 1;
        ProtocolError::Malformed(reason)
    }
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
struct RpcError {
    code: i64,
    message: String,
    data_type: Option<String>,
}

impl RpcError {
    fn parse(v: &Value) -> Self {
        RpcError {
            code: v.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: v
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .to_string(),
            data_type: v
                .pointer("/data/type")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    /// The message verbatim, then the exception class haive-hap puts in `data.type`.
    fn describe(&self) -> String {
        match &self.data_type {
            Some(t) => format!("{} ({t})", self.message),
            None => self.message.clone(),
        }
    }
}

/// The tool each turn calls, from a `tools/list` result.
fn choose_tool(list: &Value, wanted: Option<&str>) -> Result<Target, String> {
    let tools = list
        .as_array()
        .or_else(|| list.get("tools").and_then(Value::as_array))
        .ok_or_else(|| "tools/list: the result is not a list of tools".to_string())?;
    let name_of = |t: &Value| t.get("name").and_then(Value::as_str).map(str::to_string);
    let names: Vec<String> = tools.iter().filter_map(name_of).collect();
    let pick = match wanted {
        Some(w) => tools.iter().find(|t| name_of(t).as_deref() == Some(w)),
        None => tools
            .iter()
            .find(|t| name_of(t).as_deref() == Some("execute"))
            .or_else(|| (tools.len() == 1).then(|| &tools[0]))
            .or_else(|| tools.iter().find(|t| string_arg(t).is_some())),
    };
    let Some(tool) = pick else {
        return Err(match wanted {
            Some(w) => format!("tools/list: no tool {w:?} among {names:?}"),
            None => format!("tools/list: no tool to send the user's words to among {names:?}"),
        });
    };
    let name = name_of(tool).ok_or_else(|| "tools/list: a tool without a name".to_string())?;
    let execute_shape = tool
        .pointer("/input_schema/properties/input_data")
        .is_some();
    let arg = if execute_shape {
        None
    } else {
        Some(string_arg(tool).unwrap_or_else(|| "text".to_string()))
    };
    Ok(Target::Tool { name, arg })
}

/// The tool's string argument: a required one first, else any.
fn string_arg(tool: &Value) -> Option<String> {
    let props = tool.pointer("/input_schema/properties")?.as_object()?;
    let is_string = |k: &str| {
        props
            .get(k)
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
            == Some("string")
    };
    let required = tool
        .pointer("/input_schema/required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str);
    for k in required {
        if is_string(k) {
            return Some(k.to_string());
        }
    }
    props.keys().find(|k| is_string(k)).cloned()
}

/// The agent each turn runs, from an `agent/list` result (`[{name}]`, `["name"]` or `{agents:[...]}`).
fn choose_agent(list: &Value, wanted: Option<&str>) -> Result<String, String> {
    let agents = list
        .as_array()
        .or_else(|| list.get("agents").and_then(Value::as_array))
        .ok_or_else(|| "the result is not a list of agents".to_string())?;
    let names: Vec<String> = agents
        .iter()
        .filter_map(|a| {
            a.as_str()
                .or_else(|| a.get("name").and_then(Value::as_str))
                .map(str::to_string)
        })
        .collect();
    match wanted {
        Some(w) if names.iter().any(|n| n == w) => Ok(w.to_string()),
        Some(w) => Err(format!("no agent {w:?} among {names:?}")),
        None => names
            .into_iter()
            .next()
            .ok_or_else(|| "the agent list is empty".to_string()),
    }
}

/// What to say for a call's result. A string is itself; AgentServer's `AgentExecutionResult`
/// (`status`, `result`, `error`) unwraps (a status other than success is an error); the seed's
/// `{output}` and objects with one text field give that text; anything else is compact JSON.
fn result_text(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Object(m) => {
            if let Some(status) = m.get("status").and_then(Value::as_str)
                && m.contains_key("execution_time")
            {
                if status != "success" {
                    let why = m.get("error").and_then(Value::as_str).unwrap_or("");
                    return Err(format!("agent execution {status}: {why}"));
                }
                return result_text(m.get("result").unwrap_or(&Value::Null));
            }
            for key in ["output", "text", "result", "response", "answer", "message"] {
                if let Some(inner) = m.get(key) {
                    return result_text(inner);
                }
            }
            if m.len() == 1
                && let Some(inner) = m.values().next()
            {
                return result_text(inner);
            }
            Ok(v.to_string())
        }
        other => Ok(other.to_string()),
    }
}

/// A response `id` as one of ours: integers, and integer strings (lenient).
fn rpc_id(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

impl Protocol for HapClient {
    fn name(&self) -> &'static str {
        "hap"
    }

    fn open(&mut self, now_ms: u64, _info: &SessionInfo) -> Vec<Wire> {
        // A new connection is a new agent process: nothing of the last one's calls survives.
        self.next_id = 1;
        self.pending.clear();
        self.cancelled.clear();
        self.turn = None;
        self.queue.clear();
        self.target = None;
        self.session = None;
        self.discovery = Some(Discovery::default());
        match self.settings.surface {
            Surface::Auto | Surface::Tools => vec![
                self.request(now_ms, Call::ToolsList, "tools/list", json!({})),
                self.request(
                    now_ms,
                    Call::ServerInfo,
                    "resources/read",
                    json!({ "uri": SERVER_INFO_URI }),
                ),
            ],
            Surface::Agent => vec![self.agent_list(now_ms)],
        }
    }

    fn encode(&mut self, now_ms: u64, up: Uplink) -> Result<Vec<Wire>, ProtocolError> {
        match up {
            Uplink::Text(text) => {
                let text = text.trim().to_string();
                if text.is_empty() {
                    return Err(ProtocolError::State("empty input is not sent".into()));
                }
                self.queue.push_back(text);
                Ok(self.next_turn(now_ms))
            }
            Uplink::TurnStart | Uplink::TurnEnd { .. } => Ok(Vec::new()),
            Uplink::Audio { .. } => Err(ProtocolError::State(
                "HAP carries no audio; the turn goes as its transcript".into(),
            )),
            Uplink::Interrupt => {
                // HAP has no cancel: forget the call; its answer is dropped when it comes.
                self.queue.clear();
                if let Some(t) = self.turn.take() {
                    tracing::info!(id = t.rpc_id, "barge-in: the pending HAP call is dropped");
                    self.forget(t.rpc_id);
                }
                Ok(Vec::new())
            }
        }
    }

    fn decode(&mut self, now_ms: u64, wire: Wire) -> Result<Decoded, ProtocolError> {
        let text = match wire {
            Wire::Text(t) => t,
            Wire::Binary(b) => {
                return Err(self.malformed(format!(
                    "binary frame of {} bytes (HAP sends JSON lines)",
                    b.len()
                )));
            }
        };
        let v: Value = serde_json::from_str(text.trim())
            .map_err(|e| self.malformed(format!("not JSON: {e}")))?;
        let Some(obj) = v.as_object() else {
            return Err(self.malformed("not a JSON-RPC object".into()));
        };
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            tracing::debug!("HAP message without jsonrpc 2.0; read anyway");
        }
        let id = obj.get("id").filter(|i| !i.is_null());
        if let Some(method) = obj.get("method").and_then(Value::as_str) {
            let params = obj.get("params").cloned().unwrap_or(Value::Null);
            let events = if id.is_some() {
                vec![Downlink::Unknown {
                    kind: method.to_string(),
                    reason: "a request from the agent (HAP servers send none)".into(),
                }]
            } else {
                self.on_notification(method, &params)
            };
            return Ok(Decoded {
                events,
                replies: Vec::new(),
            });
        }
        let outcome = match (obj.get("result"), obj.get("error")) {
            (_, Some(e)) if e.is_object() => Err(RpcError::parse(e)),
            // Lenient: an error that is not the JSON-RPC object (a bare string or code) still ends
            // the call, at once, rather than when the call times out.
            (_, Some(e)) if !e.is_null() => {
                self.stats.malformed += 1;
                Err(RpcError {
                    code: e.as_i64().unwrap_or(0),
                    message: e.as_str().map_or_else(|| e.to_string(), str::to_string),
                    data_type: None,
                })
            }
            (Some(r), _) => Ok(r.clone()),
            // A pending call's answer with neither: a broken reply, not one to wait for.
            _ if id
                .and_then(rpc_id)
                .is_some_and(|i| self.pending.contains_key(&i)) =>
            {
                self.stats.malformed += 1;
                Err(RpcError {
                    code: 0,
                    message: "the agent answered with neither result nor error".into(),
                    data_type: None,
                })
            }
            _ => return Err(self.malformed("neither result, error nor method".into())),
        };
        let Some(rid) = id.and_then(rpc_id) else {
            let reason = match &outcome {
                Err(e) => format!("error {} without a usable id: {}", e.code, e.describe()),
                Ok(_) => "result without a usable id".into(),
            };
            tracing::warn!(%reason, id = ?id, "HAP response skipped");
            return Ok(Decoded {
                events: vec![Downlink::Unknown {
                    kind: "response".into(),
                    reason,
                }],
                replies: Vec::new(),
            });
        };
        let Some(pending) = self.pending.remove(&rid) else {
            if self.cancelled.contains(&rid) {
                tracing::debug!(id = rid, "late answer of a dropped HAP call discarded");
                self.stats.cancelled_run_frames_dropped += 1;
                return Ok(Decoded::default());
            }
            return Ok(Decoded {
                events: vec![Downlink::Unknown {
                    kind: "response".into(),
                    reason: format!("answer to id {rid}, which is not a pending call"),
                }],
                replies: Vec::new(),
            });
        };
        tracing::trace!(id = rid, method = pending.method, "HAP answer");
        let mut events = Vec::new();
        let replies = self.on_response(now_ms, pending, rid, outcome, &mut events);
        Ok(Decoded { events, replies })
    }

    fn poll(&mut self, now_ms: u64) -> Vec<Wire> {
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        if due.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut fatal = None;
        for id in due {
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            let message = format!(
                "no answer to {} within {} ms",
                p.method, self.settings.request_timeout_ms
            );
            let call = p.call.clone();
            self.forget(id);
            tracing::warn!(%message, "HAP call timed out");
            match call {
                Call::Execute => {
                    self.finish_turn(Err(("timeout".into(), message)), &mut out);
                }
                // Server info is optional; the rest of discovery is not.
                Call::ServerInfo => {
                    if let Some(d) = self.discovery.as_mut() {
                        d.info_done = true;
                    }
                }
                _ => fatal = Some(message),
            }
        }
        if let Some(message) = fatal {
            self.discovery_failed(message, &mut out);
        } else {
            self.maybe_ready(&mut out);
        }
        let wires = self.next_turn(now_ms);
        self.events.extend(out);
        wires
    }

    fn next_deadline(&self) -> Option<u64> {
        self.pending.values().map(|p| p.deadline_ms).min()
    }

    fn stats(&self) -> CodecStats {
        self.stats
    }

    fn take_events(&mut self) -> Vec<Downlink> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_text_shapes() {
        assert_eq!(result_text(&json!("hi")).unwrap(), "hi");
        assert_eq!(result_text(&json!({"echo": "hello"})).unwrap(), "hello");
        assert_eq!(
            result_text(&json!({"output": "Analysis results", "metadata": {"duration": 1.5}}))
                .unwrap(),
            "Analysis results"
        );
        assert_eq!(
            result_text(&json!({"status":"success","result":{"echo":{"text":"hi"}},"execution_time":0.01,"metadata":{}})).unwrap(),
            "hi"
        );
        let e =
            result_text(&json!({"status":"error","error":"boom","execution_time":0})).unwrap_err();
        assert!(e.contains("boom"), "{e}");
        assert_eq!(
            result_text(&json!({"a": 1, "b": 2})).unwrap(),
            r#"{"a":1,"b":2}"#
        );
        assert_eq!(result_text(&json!(42)).unwrap(), "42");
    }

    #[test]
    fn tool_choice() {
        let list = json!([{"name":"echo","input_schema":{"type":"object","properties":{"text":{"type":"string"}},"required":["text"]}}]);
        assert_eq!(
            choose_tool(&list, None).unwrap(),
            Target::Tool {
                name: "echo".into(),
                arg: Some("text".into())
            }
        );
        assert!(
            choose_tool(&list, Some("nope"))
                .unwrap_err()
                .contains("nope")
        );
        let list = json!([{"name":"validate_output","input_schema":{"type":"object"}},{"name":"execute","input_schema":{"type":"object","properties":{"input_data":{"type":"object"}}}}]);
        assert_eq!(
            choose_tool(&list, None).unwrap(),
            Target::Tool {
                name: "execute".into(),
                arg: None
            }
        );
        assert!(choose_tool(&json!([]), None).is_err());
        assert!(choose_tool(&json!({"x": 1}), None).is_err());
    }

    #[test]
    fn agent_choice() {
        assert_eq!(
            choose_agent(&json!([{"name":"a"},{"name":"b"}]), None).unwrap(),
            "a"
        );
        assert_eq!(
            choose_agent(&json!({"agents":["a","b"]}), Some("b")).unwrap(),
            "b"
        );
        assert!(choose_agent(&json!([]), None).is_err());
        assert!(choose_agent(&json!(["a"]), Some("z")).is_err());
    }
}
