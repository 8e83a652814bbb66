//! TurnMachine: who has the floor. Pure and synchronous: `handle(now, input) -> actions`, with
//! `poll_deadline()` telling the caller when it next needs a `Tick`. No I/O, no clock of its own: `now`
//! is the audio clock (ms of input processed), so a file runs exactly like a live microphone.
//!
//! States: Idle -> UserSpeaking -> AwaitingAgent -> AgentSpeaking -> Idle; barge-in goes
//! AgentSpeaking -> UserSpeaking; Disconnected while an agent is configured but unreachable.
//!
//! Gating: speech that starts while something is playing, or within `post_playback_mute_ms` after it
//! stopped, is a *candidate*: it must last `barge_in_min_ms` to count (dropped only by a `SpeechEnd`
//! before then, which the VAD sends a hangover after the speech: below about the VAD's start
//! debounce (`vad.barge_in_start_ms` while the device plays) + hangover the minimum only delays the
//! flush, hence 0 with echo cancellation). An answer nobody waited for (`AgentResponse` in Idle: a
//! late one, or the agent's own) holds the floor like any other. If it does, playback is flushed
//! (and, over the agent, an Interrupt is emitted) and the candidate's frames, pre-roll included, open the
//! user's next turn, so no word is lost. If it does not, it was a blip (or the speaker's own echo) and is
//! dropped. Speech while the agent holds the floor in silence (nothing played for
//! `post_playback_mute_ms`) has no minimum: there is nothing it could be the echo of.
//!
//! The floor: an agent that holds it with nothing playing and no sign of itself for
//! `response_timeout_ms` (a run that never ends, a long tool call) gives it back (`went_quiet`):
//! more of that run takes it again, and a user turn started meanwhile cancels the run. A run that
//! starts while the user speaks is flushed and cancelled; one that starts in the pause before the
//! end of the turn (an agent that found the end of speech itself) ends the turn there and answers it.

use serde::Serialize;

use crate::audio::earcon::Earcon;
use crate::config::{BargeIn, TurnConfig};
use crate::dsp::worker::AudioFrame;

/// Milliseconds on the audio clock.
pub type Ms = u64;

/// Most frames held for a candidate barge-in (10 s of 20 ms frames): more than any `barge_in_min_ms`
/// plus pre-roll; older ones are dropped if it ever fills.
const MAX_CANDIDATE_FRAMES: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Idle,
    UserSpeaking,
    AwaitingAgent,
    AgentSpeaking,
    Disconnected,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Debounced speech start; `at` is where it began (before the debounce).
    SpeechStart {
        at: Ms,
    },
    /// Debounced speech end; `at` is where it ended.
    SpeechEnd {
        at: Ms,
    },
    /// An encoded uplink frame.
    Frame(AudioFrame),
    /// Time passes.
    Tick,
    /// Something started playing (agent audio or an earcon).
    PlaybackStarted,
    /// Everything queued has played.
    PlaybackIdle,
    /// The agent began its answer (run started, first text or audio).
    AgentStarted,
    /// The agent started a new response (a run), asked for or not: a late answer after the response
    /// timeout, or one of its own (a reminder). Also in Idle it holds the floor, so speaking over it
    /// is a barge-in and the agent is told to stop.
    AgentResponse,
    /// The agent's answer is complete on the wire (playback may still be running).
    AgentFinished,
    /// The agent reported an error for this turn.
    AgentError,
    Connected,
    Disconnected,
    /// The input (a file) ended: close any open turn.
    InputEnded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// `end_silence_ms` of silence after the last word.
    Silence,
    /// The turn reached `max_utterance_ms`.
    MaxLength,
    /// The input ended.
    InputEnded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscardReason {
    /// Too short to interrupt the agent.
    TooShortForBargeIn,
    /// Too short to count while something was playing or just after (echo tail).
    TooShortAfterPlayback,
    /// Barge-in is off: the mic is ignored while the agent speaks.
    BargeInOff,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    StateChanged {
        from: State,
        to: State,
    },
    TurnStarted {
        at: Ms,
    },
    /// Send this frame as part of the current turn.
    SendFrame(AudioFrame),
    TurnEnded {
        /// Where the user's speech ended.
        at: Ms,
        duration_ms: Ms,
        frames: u32,
        reason: EndReason,
    },
    /// Tell the DSP worker to stop producing frames.
    StopStream,
    /// Stop playback now (fade of a few ms).
    FlushPlayback,
    /// Tell the agent to cancel its answer.
    Interrupt,
    BargeIn {
        /// Where the user's speech began.
        onset: Ms,
        /// When it was confirmed.
        at: Ms,
    },
    /// Speech that did not become a turn.
    Discarded {
        onset: Ms,
        reason: DiscardReason,
    },
    PlayEarcon(Earcon),
    ResponseTimeout,
}

pub type Actions = Vec<Action>;

#[derive(Debug, Clone)]
pub struct TurnSettings {
    pub end_silence_ms: Ms,
    pub max_utterance_ms: Ms,
    pub response_timeout_ms: Ms,
    pub barge_in: bool,
    pub barge_in_min_ms: Ms,
    pub post_playback_mute_ms: Ms,
    /// Whether there is an agent to wait for (without one, a turn ends back in Idle).
    pub agent: bool,
    /// Play the "done" earcon at the end of each turn.
    pub done_earcon: bool,
}

impl TurnSettings {
    pub fn from_config(t: &TurnConfig, aec: bool, agent: bool) -> Self {
        TurnSettings {
            end_silence_ms: t.end_silence_ms as Ms,
            max_utterance_ms: t.max_utterance_ms as Ms,
            response_timeout_ms: t.response_timeout_ms as Ms,
            barge_in: t.barge_in == BargeIn::On,
            barge_in_min_ms: t.barge_in_min_ms(aec) as Ms,
            post_playback_mute_ms: t.post_playback_mute_ms as Ms,
            agent,
            done_earcon: true,
        }
    }
}

#[derive(Debug)]
struct Candidate {
    onset: Ms,
    /// How long it must last from its onset to count: `barge_in_min_ms`, or 0 when nothing it
    /// could be an echo of has played.
    min_ms: Ms,
    over_agent: bool,
    frames: Vec<AudioFrame>,
}

#[derive(Debug)]
pub struct TurnMachine {
    s: TurnSettings,
    state: State,
    now: Ms,
    connected: bool,
    speech_active: bool,
    /// Speech that is being ignored until it ends.
    ignoring: bool,
    turn_start: Ms,
    turn_frames: u32,
    last_speech_end: Option<Ms>,
    awaiting_since: Ms,
    agent_done: bool,
    /// Whether an error in AgentSpeaking plays the error earcon: false only for the late answer to
    /// a turn whose response timeout has already played it.
    answering: bool,
    /// The last turn timed out (its error earcon played) and no run has come since, nor a new turn.
    timed_out: bool,
    playing: bool,
    mute_until: Ms,
    /// The last sign of the agent while it holds the floor (its run started, text or audio came,
    /// playback started or ended): `response_timeout_ms` of silence after it gives the floor back.
    agent_heard: Ms,
    /// The floor went back to Idle that way with the run still open: more of it takes it again.
    went_quiet: bool,
    /// A turn ended while offline: wait for the answer once reconnected.
    pending_turn: bool,
    candidate: Option<Candidate>,
}

impl TurnMachine {
    /// A machine in Idle (no agent, or agent connected) or Disconnected (agent not yet connected).
    pub fn new(s: TurnSettings) -> Self {
        let state = if s.agent {
            State::Disconnected
        } else {
            State::Idle
        };
        TurnMachine {
            connected: !s.agent,
            s,
            state,
            now: 0,
            speech_active: false,
            ignoring: false,
            turn_start: 0,
            turn_frames: 0,
            last_speech_end: None,
            awaiting_since: 0,
            agent_done: false,
            answering: false,
            timed_out: false,
            playing: false,
            mute_until: 0,
            agent_heard: 0,
            went_quiet: false,
            pending_turn: false,
            candidate: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn settings(&self) -> &TurnSettings {
        &self.s
    }

    /// The next time at which a `Tick` can change something, if any.
    pub fn poll_deadline(&self) -> Option<Ms> {
        let mut d: Option<Ms> = None;
        let mut at = |t: Ms| d = Some(d.map_or(t, |x: Ms| x.min(t)));
        if let Some(c) = &self.candidate {
            at(c.onset + c.min_ms);
        }
        match self.state {
            State::UserSpeaking => {
                at(self.turn_start + self.s.max_utterance_ms);
                if !self.speech_active
                    && let Some(end) = self.last_speech_end
                {
                    at(end + self.s.end_silence_ms);
                }
            }
            State::AwaitingAgent if self.connected => {
                at(self.awaiting_since + self.s.response_timeout_ms)
            }
            State::AgentSpeaking if !self.playing => {
                at(self.agent_heard + self.s.response_timeout_ms)
            }
            _ => {}
        }
        d
    }

    pub fn handle(&mut self, now: Ms, input: Input) -> Actions {
        self.now = self.now.max(now);
        let mut out = Actions::new();
        // Deadlines that passed before this input fire first.
        self.check_deadlines(&mut out);
        match input {
            Input::SpeechStart { at } => self.speech_start(at, &mut out),
            Input::SpeechEnd { at } => self.speech_end(at, &mut out),
            Input::Frame(f) => self.frame(f, &mut out),
            Input::Tick => {}
            Input::PlaybackStarted => {
                self.playing = true;
                self.agent_heard = self.now;
                if self.state == State::Idle && self.went_quiet {
                    // The quiet run's audio (or its tool's earcon): the floor is its again.
                    self.went_quiet = false;
                    self.set_state(State::AgentSpeaking, &mut out);
                }
            }
            Input::PlaybackIdle => {
                self.playing = false;
                self.agent_heard = self.now;
                self.mute_until = self.now + self.s.post_playback_mute_ms;
                if self.state == State::AgentSpeaking && self.agent_done {
                    self.set_state(State::Idle, &mut out);
                }
            }
            Input::AgentStarted => {
                self.agent_heard = self.now;
                if self.state == State::AwaitingAgent {
                    self.agent_done = false;
                    self.answering = true;
                    self.set_state(State::AgentSpeaking, &mut out);
                } else if self.state == State::Idle && self.went_quiet {
                    // The run that went quiet (a long tool call) goes on: it has the floor again.
                    self.went_quiet = false;
                    self.set_state(State::AgentSpeaking, &mut out);
                }
            }
            Input::AgentResponse => {
                self.agent_heard = self.now;
                self.went_quiet = false;
                if self.state == State::AgentSpeaking {
                    // Another run while the last one still plays: the floor stays the agent's
                    // until this one has finished too.
                    self.agent_done = false;
                } else if matches!(self.state, State::AwaitingAgent | State::Idle) {
                    self.agent_done = false;
                    // From Idle after a response timeout: the late answer, whose failure the
                    // user has already been told of. Any other run (the answer, a resumed one
                    // after a reconnect, the agent's own) tells of its failure.
                    self.answering = self.state == State::AwaitingAgent || !self.timed_out;
                    self.timed_out = false;
                    self.set_state(State::AgentSpeaking, &mut out);
                    // Speech already under way (a candidate over an earcon's tail, say) is now
                    // speech over the agent.
                    if let Some(c) = &mut self.candidate {
                        c.over_agent = true;
                    }
                } else if self.state == State::UserSpeaking {
                    if !self.speech_active
                        && let Some(end) = self.last_speech_end
                    {
                        // In the pause before `end_silence_ms` ends the turn: an agent that finds
                        // the end of speech itself is answering it. The turn ends here.
                        self.end_turn(end, EndReason::Silence, &mut out);
                        if self.state == State::AwaitingAgent {
                            self.agent_done = false;
                            self.answering = true;
                            self.set_state(State::AgentSpeaking, &mut out);
                        }
                    } else {
                        // The user is speaking: a run that starts now (a late answer to a turn the
                        // user has gone on from, the agent's own) would play over them. Stop it.
                        out.push(Action::FlushPlayback);
                        out.push(Action::Interrupt);
                    }
                }
            }
            Input::AgentFinished => match self.state {
                State::Idle => self.went_quiet = false,
                State::AgentSpeaking => {
                    self.agent_done = true;
                    if !self.playing {
                        self.mute_until = self.now + self.s.post_playback_mute_ms;
                        self.set_state(State::Idle, &mut out);
                    }
                }
                State::AwaitingAgent => self.set_state(State::Idle, &mut out),
                _ => {}
            },
            Input::AgentError => match self.state {
                State::Idle => self.went_quiet = false,
                State::AwaitingAgent => {
                    out.push(Action::PlayEarcon(Earcon::Error));
                    self.set_state(State::Idle, &mut out);
                }
                State::AgentSpeaking => {
                    // The late answer after a response timeout fails quietly: the user has
                    // heard the error earcon for that turn already.
                    if self.answering {
                        out.push(Action::PlayEarcon(Earcon::Error));
                    }
                    self.set_state(State::Idle, &mut out);
                }
                _ => {}
            },
            Input::Connected => {
                self.connected = true;
                if self.state == State::Disconnected {
                    if self.pending_turn {
                        self.pending_turn = false;
                        self.awaiting_since = self.now;
                        self.set_state(State::AwaitingAgent, &mut out);
                    } else {
                        self.set_state(State::Idle, &mut out);
                    }
                }
            }
            Input::Disconnected => {
                self.connected = false;
                self.went_quiet = false;
                match self.state {
                    // The user keeps talking; the session holds the frames until it reconnects.
                    State::UserSpeaking | State::Disconnected => {}
                    State::AwaitingAgent => {
                        self.pending_turn = true;
                        self.set_state(State::Disconnected, &mut out);
                    }
                    State::Idle | State::AgentSpeaking => {
                        self.set_state(State::Disconnected, &mut out)
                    }
                }
            }
            Input::InputEnded => {
                if let Some(c) = self.candidate.take() {
                    out.push(Action::StopStream);
                    out.push(Action::Discarded {
                        onset: c.onset,
                        reason: discard_reason(c.over_agent),
                    });
                }
                if self.state == State::UserSpeaking {
                    let end = self.last_speech_end.unwrap_or(self.now);
                    self.end_turn(end, EndReason::InputEnded, &mut out);
                }
            }
        }
        self.check_deadlines(&mut out);
        out
    }

    fn speech_start(&mut self, at: Ms, out: &mut Actions) {
        self.speech_active = true;
        match self.state {
            State::UserSpeaking => self.last_speech_end = None,
            State::AgentSpeaking if !self.s.barge_in => {
                self.ignoring = true;
                out.push(Action::StopStream);
                out.push(Action::Discarded {
                    onset: at,
                    reason: DiscardReason::BargeInOff,
                });
            }
            State::AgentSpeaking => {
                // The agent holds the floor: speaking is a barge-in. It is held to the minimum
                // only while something plays or just did (what the mic hears may be its echo);
                // in a silence of the agent's (between its sentences, during a tool call) it
                // interrupts at once, so a short "yes" is not lost.
                let echo_possible = self.playing || at < self.mute_until;
                self.candidate = Some(Candidate {
                    onset: at,
                    min_ms: if echo_possible {
                        self.s.barge_in_min_ms
                    } else {
                        0
                    },
                    over_agent: true,
                    frames: Vec::new(),
                })
            }
            State::Idle | State::AwaitingAgent | State::Disconnected => {
                if self.playing || at < self.mute_until {
                    self.candidate = Some(Candidate {
                        onset: at,
                        min_ms: self.s.barge_in_min_ms,
                        over_agent: false,
                        frames: Vec::new(),
                    });
                } else {
                    self.start_turn(at, out);
                }
            }
        }
    }

    fn speech_end(&mut self, at: Ms, out: &mut Actions) {
        self.speech_active = false;
        if self.ignoring {
            self.ignoring = false;
            return;
        }
        if let Some(c) = self.candidate.take() {
            out.push(Action::StopStream);
            out.push(Action::Discarded {
                onset: c.onset,
                reason: discard_reason(c.over_agent),
            });
            return;
        }
        if self.state == State::UserSpeaking {
            self.last_speech_end = Some(at);
        }
    }

    fn frame(&mut self, f: AudioFrame, out: &mut Actions) {
        if self.state == State::UserSpeaking {
            self.turn_frames += 1;
            out.push(Action::SendFrame(f));
        } else if let Some(c) = &mut self.candidate {
            if c.frames.len() == MAX_CANDIDATE_FRAMES {
                c.frames.remove(0);
            }
            c.frames.push(f);
        }
        // Otherwise the frame belongs to no turn (stream stop in flight): dropped.
    }

    fn start_turn(&mut self, at: Ms, out: &mut Actions) {
        if self.state == State::AwaitingAgent {
            // The user said more before the answer came: cancel it, this turn replaces it.
            out.push(Action::Interrupt);
        } else if self.went_quiet {
            // The run that went quiet is still open: the user takes the floor from it, as in a
            // barge-in, so the rest of it neither plays over them nor passes for the answer.
            out.push(Action::Interrupt);
        }
        self.turn_start = at;
        self.turn_frames = 0;
        self.last_speech_end = None;
        self.pending_turn = false;
        self.went_quiet = false;
        self.set_state(State::UserSpeaking, out);
        out.push(Action::TurnStarted { at });
    }

    fn end_turn(&mut self, at: Ms, reason: EndReason, out: &mut Actions) {
        out.push(Action::StopStream);
        out.push(Action::TurnEnded {
            at,
            duration_ms: at.saturating_sub(self.turn_start),
            frames: self.turn_frames,
            reason,
        });
        if self.s.done_earcon {
            out.push(Action::PlayEarcon(Earcon::Done));
        }
        if reason == EndReason::MaxLength && self.speech_active {
            self.ignoring = true; // the rest of this speech is not a new turn
        }
        self.last_speech_end = None;
        self.timed_out = false;
        if !self.s.agent {
            self.set_state(State::Idle, out);
        } else if self.connected {
            self.awaiting_since = self.now;
            self.set_state(State::AwaitingAgent, out);
        } else {
            self.pending_turn = true;
            self.set_state(State::Disconnected, out);
        }
    }

    fn check_deadlines(&mut self, out: &mut Actions) {
        if let Some(c) = &self.candidate
            && self.speech_active
            && self.now >= c.onset + c.min_ms
        {
            let Some(c) = self.candidate.take() else {
                return;
            };
            out.push(Action::FlushPlayback);
            if c.over_agent {
                out.push(Action::Interrupt);
                out.push(Action::BargeIn {
                    onset: c.onset,
                    at: self.now,
                });
            }
            self.start_turn(c.onset, out);
            for mut f in c.frames {
                // Held back by the gate, so not "live" for the capture-to-socket latency figure.
                f.live = false;
                self.turn_frames += 1;
                out.push(Action::SendFrame(f));
            }
        }
        match self.state {
            State::UserSpeaking => {
                if self.now >= self.turn_start + self.s.max_utterance_ms {
                    self.end_turn(self.now, EndReason::MaxLength, out);
                } else if !self.speech_active
                    && let Some(end) = self.last_speech_end
                    && self.now >= end + self.s.end_silence_ms
                {
                    self.end_turn(end, EndReason::Silence, out);
                }
            }
            State::AwaitingAgent
                if self.connected
                    && self.now >= self.awaiting_since + self.s.response_timeout_ms =>
            {
                out.push(Action::ResponseTimeout);
                out.push(Action::PlayEarcon(Earcon::Error));
                self.timed_out = true;
                self.set_state(State::Idle, out);
            }
            // The agent holds the floor with nothing to say: a run that never finishes (an agent
            // that sends no run end, such as the HAIP reference server, or one that lost it) or a
            // long tool call. The device listens as usual again; more of that run takes the
            // floor back (`went_quiet`).
            State::AgentSpeaking
                if !self.playing && self.now >= self.agent_heard + self.s.response_timeout_ms =>
            {
                self.went_quiet = true;
                self.set_state(State::Idle, out);
            }
            _ => {}
        }
    }

    fn set_state(&mut self, to: State, out: &mut Actions) {
        if self.state != to {
            out.push(Action::StateChanged {
                from: self.state,
                to,
            });
            self.state = to;
        }
    }
}

fn discard_reason(over_agent: bool) -> DiscardReason {
    if over_agent {
        DiscardReason::TooShortForBargeIn
    } else {
        DiscardReason::TooShortAfterPlayback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TurnSettings {
        TurnSettings {
            end_silence_ms: 700,
            max_utterance_ms: 15_000,
            response_timeout_ms: 10_000,
            barge_in: true,
            barge_in_min_ms: 0,
            post_playback_mute_ms: 250,
            agent: true,
            done_earcon: false,
        }
    }

    fn connected() -> TurnMachine {
        connected_with(settings())
    }

    fn connected_with(s: TurnSettings) -> TurnMachine {
        let mut tm = TurnMachine::new(s);
        tm.handle(0, Input::Connected);
        assert_eq!(tm.state(), State::Idle);
        tm
    }

    /// The agent's answer (a run) starts at `at` and plays.
    fn answer_plays(tm: &mut TurnMachine, at: Ms) {
        tm.handle(at, Input::AgentResponse);
        tm.handle(at, Input::PlaybackStarted);
    }

    /// A whole user turn from `at`: speech for 500 ms, then the end silence.
    fn user_turn(tm: &mut TurnMachine, at: Ms) -> Actions {
        let mut out = tm.handle(at, Input::SpeechStart { at });
        out.extend(tm.handle(at + 500, Input::SpeechEnd { at: at + 500 }));
        out.extend(tm.handle(at + 1_200, Input::Tick));
        out
    }

    fn barged_in(out: &Actions) -> bool {
        out.contains(&Action::FlushPlayback)
            && out.contains(&Action::Interrupt)
            && out.iter().any(|a| matches!(a, Action::BargeIn { .. }))
    }

    #[test]
    fn a_turn_ends_after_the_end_silence_and_waits_for_the_agent() {
        let mut tm = connected();
        let out = user_turn(&mut tm, 1_000);
        assert!(out.contains(&Action::TurnStarted { at: 1_000 }), "{out:?}");
        assert!(
            out.iter().any(|a| matches!(
                a,
                Action::TurnEnded {
                    at: 1_500,
                    reason: EndReason::Silence,
                    ..
                }
            )),
            "{out:?}"
        );
        assert_eq!(tm.state(), State::AwaitingAgent);
    }

    #[test]
    fn speech_over_the_answer_is_a_barge_in() {
        let mut tm = connected();
        user_turn(&mut tm, 1_000);
        answer_plays(&mut tm, 2_300);
        assert_eq!(tm.state(), State::AgentSpeaking);
        let out = tm.handle(3_000, Input::SpeechStart { at: 2_970 });
        assert!(barged_in(&out), "{out:?}");
        assert_eq!(tm.state(), State::UserSpeaking);
    }

    #[test]
    fn an_answer_nobody_waited_for_can_be_barged_in_too() {
        // The agent answers after the response timeout (or speaks on its own): the machine is Idle.
        let mut tm = connected();
        user_turn(&mut tm, 1_000);
        let out = tm.handle(12_500, Input::Tick);
        assert!(out.contains(&Action::ResponseTimeout), "{out:?}");
        assert_eq!(tm.state(), State::Idle);
        tm.handle(13_000, Input::AgentResponse);
        tm.handle(13_000, Input::AgentStarted);
        tm.handle(13_000, Input::PlaybackStarted);
        assert_eq!(tm.state(), State::AgentSpeaking);
        let out = tm.handle(14_000, Input::SpeechStart { at: 13_970 });
        assert!(barged_in(&out), "{out:?}");
        // Without the run start (audio or text alone), Idle stays Idle: a straggler of a finished
        // answer does not take the floor.
        let mut tm = connected();
        tm.handle(1_000, Input::AgentStarted);
        assert_eq!(tm.state(), State::Idle);
    }

    #[test]
    fn an_error_earcon_is_played_once_for_a_turn() {
        let error = |out: &Actions| out.contains(&Action::PlayEarcon(Earcon::Error));
        // The answer to the user's turn fails: one earcon.
        let mut tm = connected();
        user_turn(&mut tm, 1_000);
        tm.handle(2_500, Input::AgentResponse);
        let out = tm.handle(3_000, Input::AgentError);
        assert!(error(&out), "{out:?}");
        assert_eq!(tm.state(), State::Idle);
        // The same before the run started.
        let mut tm = connected();
        user_turn(&mut tm, 1_000);
        let out = tm.handle(3_000, Input::AgentError);
        assert!(error(&out), "{out:?}");
        // The response timeout plays it; the late run that then fails (a HAP call that ends in an
        // error) does not play it again, and gives the floor back.
        let mut tm = connected();
        user_turn(&mut tm, 1_000);
        let out = tm.handle(12_500, Input::Tick);
        assert!(
            out.contains(&Action::ResponseTimeout) && error(&out),
            "{out:?}"
        );
        tm.handle(13_000, Input::AgentResponse);
        assert_eq!(tm.state(), State::AgentSpeaking);
        let out = tm.handle(13_000, Input::AgentError);
        assert!(!error(&out), "{out:?}");
        assert_eq!(tm.state(), State::Idle);
        // Only that run: the next one that fails (the agent's own) plays it.
        tm.handle(20_000, Input::AgentResponse);
        let out = tm.handle(20_500, Input::AgentError);
        assert!(error(&out), "{out:?}");
        // A run of the agent's own, with no turn before it, that fails.
        let mut tm = connected();
        tm.handle(1_000, Input::AgentResponse);
        let out = tm.handle(1_500, Input::AgentError);
        assert!(error(&out), "{out:?}");
        // Turns queued behind a slow call (HAP and ARP answer one at a time): the first turn
        // times out, the user asks again; the first call's late answer comes while the second
        // turn waits, then the second call starts from Idle and fails. Its failure is heard.
        let mut tm = connected();
        user_turn(&mut tm, 1_000);
        tm.handle(12_500, Input::Tick); // the first turn's timeout
        user_turn(&mut tm, 13_000);
        assert_eq!(tm.state(), State::AwaitingAgent);
        tm.handle(15_000, Input::AgentResponse);
        tm.handle(15_000, Input::AgentFinished);
        assert_eq!(tm.state(), State::Idle);
        tm.handle(16_000, Input::AgentResponse);
        let out = tm.handle(16_500, Input::AgentError);
        assert!(error(&out), "{out:?}");
        // An answer cut by a lost connection and resumed on the next (H2A, HAIP): it starts from
        // Idle, and its failure is heard.
        let mut tm = connected();
        user_turn(&mut tm, 1_000);
        tm.handle(2_000, Input::AgentResponse);
        tm.handle(2_500, Input::Disconnected);
        tm.handle(3_000, Input::Connected);
        assert_eq!(tm.state(), State::Idle);
        tm.handle(3_100, Input::AgentResponse);
        let out = tm.handle(3_500, Input::AgentError);
        assert!(error(&out), "{out:?}");
    }

    #[test]
    fn the_answer_over_ends_in_idle_once_played() {
        let mut tm = connected();
        answer_plays(&mut tm, 1_000);
        tm.handle(2_000, Input::AgentFinished);
        assert_eq!(tm.state(), State::AgentSpeaking, "still playing");
        tm.handle(3_000, Input::PlaybackIdle);
        assert_eq!(tm.state(), State::Idle);
    }

    #[test]
    fn a_second_run_while_the_first_still_plays_keeps_the_floor() {
        let mut tm = connected();
        answer_plays(&mut tm, 1_000);
        tm.handle(1_500, Input::AgentFinished);
        tm.handle(2_000, Input::AgentResponse); // the agent goes on with another run
        tm.handle(3_000, Input::PlaybackIdle); // a gap between the two runs' audio
        assert_eq!(tm.state(), State::AgentSpeaking);
        let out = tm.handle(3_200, Input::SpeechStart { at: 3_150 });
        assert!(barged_in(&out), "{out:?}");
        // While the user speaks, a run that starts is stopped: it would play over them.
        let out = tm.handle(3_300, Input::AgentResponse);
        assert_eq!(out, vec![Action::FlushPlayback, Action::Interrupt]);
        assert_eq!(tm.state(), State::UserSpeaking);
        // In the pause before the end silence ends the turn, it is the answer to the turn (an
        // agent that found the end of speech itself): the turn ends where the speech did.
        tm.handle(3_600, Input::SpeechEnd { at: 3_600 });
        let out = tm.handle(4_000, Input::AgentResponse);
        assert!(
            out.iter().any(|a| matches!(
                a,
                Action::TurnEnded {
                    at: 3_600,
                    reason: EndReason::Silence,
                    ..
                }
            )),
            "{out:?}"
        );
        assert!(!out.contains(&Action::Interrupt), "{out:?}");
        assert_eq!(tm.state(), State::AgentSpeaking);
    }

    #[test]
    fn a_blip_over_the_agent_is_dropped_when_a_minimum_is_set() {
        let mut tm = connected_with(TurnSettings {
            barge_in_min_ms: 400,
            ..settings()
        });
        answer_plays(&mut tm, 1_000);
        tm.handle(2_000, Input::SpeechStart { at: 1_950 });
        let out = tm.handle(2_200, Input::SpeechEnd { at: 2_100 });
        assert!(
            out.contains(&Action::Discarded {
                onset: 1_950,
                reason: DiscardReason::TooShortForBargeIn
            }),
            "{out:?}"
        );
        assert_eq!(tm.state(), State::AgentSpeaking);
        // Long enough: a barge-in once the minimum has passed.
        tm.handle(3_000, Input::SpeechStart { at: 2_950 });
        let out = tm.handle(3_350, Input::Tick);
        assert!(barged_in(&out), "{out:?}");
    }

    #[test]
    fn speech_in_a_silence_of_the_agent_interrupts_at_once() {
        // Without echo cancellation the minimum is 400 ms, but only while the mic may be hearing
        // the device: between two of the agent's sentences (its run still open) a short "yes"
        // interrupts it at once and is not lost.
        let mut tm = connected_with(TurnSettings {
            barge_in_min_ms: 400,
            ..settings()
        });
        answer_plays(&mut tm, 1_000);
        tm.handle(3_000, Input::PlaybackIdle);
        assert_eq!(tm.state(), State::AgentSpeaking);
        // Within post_playback_mute_ms (250) it may be the echo's tail: held to the minimum.
        let out = tm.handle(3_200, Input::SpeechStart { at: 3_100 });
        assert!(!barged_in(&out), "{out:?}");
        tm.handle(3_300, Input::SpeechEnd { at: 3_250 });
        // After it: at once, with no Tick.
        let out = tm.handle(3_600, Input::SpeechStart { at: 3_500 });
        assert!(barged_in(&out), "{out:?}");
        assert!(out.contains(&Action::TurnStarted { at: 3_500 }), "{out:?}");
    }

    #[test]
    fn an_agent_that_never_ends_its_run_gives_the_floor_back() {
        // The HAIP reference server answers with text and no run: nothing ever finishes it.
        let mut tm = connected_with(TurnSettings {
            barge_in: false,
            ..settings()
        });
        user_turn(&mut tm, 1_000);
        tm.handle(2_500, Input::AgentStarted);
        assert_eq!(tm.state(), State::AgentSpeaking);
        assert_eq!(tm.poll_deadline(), Some(12_500));
        tm.handle(12_499, Input::Tick);
        assert_eq!(tm.state(), State::AgentSpeaking);
        tm.handle(12_500, Input::Tick);
        assert_eq!(tm.state(), State::Idle);
        // Not deaf any more (with barge-in off, speech over the agent is ignored): a new turn.
        let out = tm.handle(13_000, Input::SpeechStart { at: 12_970 });
        assert!(out.contains(&Action::TurnStarted { at: 12_970 }), "{out:?}");
    }

    #[test]
    fn a_run_that_went_quiet_takes_the_floor_back_when_it_goes_on() {
        for more in [Input::AgentStarted, Input::PlaybackStarted] {
            let mut tm = connected();
            answer_plays(&mut tm, 1_000);
            tm.handle(2_000, Input::PlaybackIdle); // a long tool call, say
            tm.handle(12_000, Input::Tick);
            assert_eq!(tm.state(), State::Idle);
            tm.handle(15_000, more.clone());
            assert_eq!(tm.state(), State::AgentSpeaking, "{more:?}");
            tm.handle(15_000, Input::PlaybackStarted);
            let out = tm.handle(15_500, Input::SpeechStart { at: 15_470 });
            assert!(barged_in(&out), "{more:?}: {out:?}");
        }
        // The user speaks while it is quiet: a turn of their own, and the open run is cancelled.
        let mut tm = connected();
        tm.handle(1_000, Input::AgentResponse);
        tm.handle(12_000, Input::Tick);
        assert_eq!(tm.state(), State::Idle);
        let out = tm.handle(13_000, Input::SpeechStart { at: 12_970 });
        assert!(out.contains(&Action::TurnStarted { at: 12_970 }), "{out:?}");
        assert!(out.contains(&Action::Interrupt), "{out:?}");
        // The next turn from Idle has nothing to cancel.
        user_turn(&mut tm, 14_000);
        tm.handle(16_000, Input::AgentFinished);
        assert_eq!(tm.state(), State::Idle);
        let out = tm.handle(20_000, Input::SpeechStart { at: 20_000 });
        assert!(!out.contains(&Action::Interrupt), "{out:?}");
        // A long answer that plays is not cut short: the floor is only given back in silence.
        let mut tm = connected();
        answer_plays(&mut tm, 1_000);
        tm.handle(30_000, Input::Tick);
        assert_eq!(tm.state(), State::AgentSpeaking);
        assert_eq!(tm.poll_deadline(), None);
    }

    #[test]
    fn with_barge_in_off_speech_over_the_agent_is_ignored() {
        let mut tm = connected_with(TurnSettings {
            barge_in: false,
            ..settings()
        });
        tm.handle(1_000, Input::AgentResponse);
        let out = tm.handle(2_000, Input::SpeechStart { at: 1_950 });
        assert!(
            out.contains(&Action::Discarded {
                onset: 1_950,
                reason: DiscardReason::BargeInOff
            }),
            "{out:?}"
        );
        assert_eq!(tm.state(), State::AgentSpeaking);
    }
}
