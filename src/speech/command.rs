//! Local programs as speech services: [`CommandTts`] (espeak-ng, piper, ...: text on stdin, audio on
//! stdout) and [`CommandStt`] (a program that reads the turn as a WAV on stdin and prints the text).
//!
//! The child is driven asynchronously through tokio's process support (pipes, exit status), never
//! with a blocking wait, and with `kill_on_drop`: cancelling a call drops its future, and dropping the
//! child sends it SIGKILL at once (tokio reaps it in the background). Its stderr is kept (the last few
//! lines) for the error of a failed run. Audio is passed on at the program's own rate: `Pcm` carries
//! it and the playback path resamples.
//!
//! TTS output is either a WAV stream or raw s16le mono. A streaming WAV writer cannot know the length
//! when it writes the header: espeak-ng `--stdout` puts 0x7FFFF000 there, others 0 or 0xFFFFFFFF. So
//! 0 and 0xFFFFFFFF mean "until the end of the stream", and any length is also ended early by the end
//! of the stream; a real length ends the audio where it says (trailing chunks are ignored).
//!
//! Timeouts: TTS waits at most `timeout` for each next piece of output (a long text streams for as long
//! as it takes, and backpressure from playback does not count); STT gives the program `timeout` from the
//! end of the turn to print its text and exit.
//!
//! Context: tokio. Nothing here spawns tasks or threads.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    CancellationToken, Pcm, SpeechError, SpeechFuture, SpeechToText, SynthStats, TextToSpeech,
    Transcript,
};

/// Unless the caller sets another (`stt.timeout_ms` / `tts.timeout_ms`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// stderr kept for the error message: the end is what explains a failure.
const STDERR_TAIL_BYTES: usize = 4096;
const STDERR_TAIL_LINES: usize = 5;
/// After the exit, what the program wrote to stderr is read for this long at most (a grandchild
/// may hold the pipe open).
const STDERR_GRACE: Duration = Duration::from_millis(200);
/// A WAV header (RIFF, fmt, any LIST/INFO chunks before data) longer than this is not one.
const MAX_WAV_HEADER_BYTES: usize = 64 * 1024;
/// Read size from the TTS program: ~190 ms at 22 kHz, and a pipe read returns what is there, so a
/// streaming program's first audio is passed on as soon as it is written.
const READ_CHUNK_BYTES: usize = 8192;
/// The longest transcript kept; the rest of the output is read and dropped.
const MAX_TRANSCRIPT_BYTES: usize = 64 * 1024;
/// The longest turn handed to an STT program (at 16 kHz: 9.4 MB of WAV); later audio is dropped.
const MAX_STT_SECONDS: usize = 300;

/// What a TTS program writes on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdoutAudio {
    /// A 16-bit PCM WAV stream (mono or more channels, mixed to mono).
    Wav,
    /// Headerless signed 16-bit little-endian mono at `rate_hz`.
    Raw { rate_hz: u32 },
}

/// The last lines a program wrote to stderr.
#[derive(Debug, Default)]
struct StderrTail {
    bytes: VecDeque<u8>,
}

impl StderrTail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(STDERR_TAIL_BYTES);
        self.bytes.drain(..excess);
    }

    /// `; stderr: "a" | "b"`, or empty when the program said nothing.
    fn describe(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            return String::new();
        }
        let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
        format!("; stderr: {}", lines[start..].join(" | "))
    }
}

/// A program and how to name it in logs and errors.
#[derive(Debug, Clone)]
struct Program {
    argv: Vec<String>,
    /// "command espeak-ng".
    service: String,
}

impl Program {
    fn new(argv: Vec<String>) -> Self {
        let name = argv
            .first()
            .map(|p| {
                std::path::Path::new(p)
                    .file_name()
                    .map_or(p.clone(), |n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "(none)".into());
        Program {
            argv,
            service: format!("command {name}"),
        }
    }

    fn failed(&self, reason: String) -> SpeechError {
        SpeechError::Failed {
            service: self.service.clone(),
            reason,
        }
    }

    fn protocol(&self, reason: String) -> SpeechError {
        SpeechError::Protocol {
            service: self.service.clone(),
            reason,
        }
    }

    fn timed_out(&self, what: &str, limit: Duration) -> SpeechError {
        SpeechError::Timeout {
            service: self.service.clone(),
            what: what.to_string(),
            ms: limit.as_millis() as u64,
        }
    }

    /// Start it with all three pipes. A program that cannot be started is `Unavailable`, named.
    fn spawn(&self) -> Result<Running, SpeechError> {
        let unavailable = |reason: String| SpeechError::Unavailable {
            service: self.service.clone(),
            reason,
        };
        let Some((program, args)) = self.argv.split_first() else {
            return Err(unavailable("no program configured".into()));
        };
        // Looked up first, as the exec would: under an emulator (qemu-user) a failed exec is not
        // reported by `spawn`, the child just exits with 127, and that must still read "not found".
        if !crate::transport::stdio::program_exists(program) {
            return Err(unavailable(format!(
                "program {program:?} not found (no such file, nor on PATH); is it installed and on \
                 PATH?"
            )));
        }
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => unavailable(format!(
                    "program {program:?} not found ({e}); is it installed and on PATH?"
                )),
                std::io::ErrorKind::PermissionDenied => {
                    unavailable(format!("program {program:?} cannot be run ({e})"))
                }
                _ => unavailable(format!("cannot start {program:?}: {e}")),
            })?;
        debug!(service = %self.service, pid = child.id(), "started");
        let (Some(stdin), Some(stdout), stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(self.failed("started without its pipes".into()));
        };
        Ok(Running {
            child,
            stdin: Some(stdin),
            stdout,
            stderr,
            tail: StderrTail::default(),
        })
    }

    /// Wait (at most `limit`) for the exit, keep reading stderr meanwhile, and turn a non-zero status
    /// into `Failed` with the stderr tail.
    async fn finish(&self, run: &mut Running, limit: Duration) -> Result<(), SpeechError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut ebuf = [0u8; 1024];
        let status: ExitStatus = loop {
            tokio::select! {
                st = run.child.wait() => {
                    break st.map_err(|e| self.failed(format!("waiting for its exit: {e}")))?;
                }
                r = read_some(&mut run.stderr, &mut ebuf), if run.stderr.is_some() => {
                    run.take_stderr(r, &ebuf);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(self.timed_out("waiting for the program to exit", limit));
                }
            }
        };
        // What it wrote just before exiting is in the pipe already.
        let _ = tokio::time::timeout(STDERR_GRACE, async {
            while run.stderr.is_some() {
                let r = read_some(&mut run.stderr, &mut ebuf).await;
                run.take_stderr(r, &ebuf);
            }
        })
        .await;
        if status.success() {
            Ok(())
        } else {
            Err(self.failed(format!("{status}{}", run.tail.describe())))
        }
    }
}

/// A started program.
struct Running {
    /// Dropping it kills the process (`kill_on_drop`).
    child: Child,
    stdin: Option<tokio::process::ChildStdin>,
    stdout: tokio::process::ChildStdout,
    stderr: Option<ChildStderr>,
    tail: StderrTail,
}

impl Running {
    /// Keep what one stderr read got; close it at its end.
    fn take_stderr(&mut self, r: std::io::Result<usize>, buf: &[u8]) {
        match r {
            Ok(0) | Err(_) => self.stderr = None,
            Ok(n) => self.tail.push(&buf[..n]),
        }
    }
}

/// One read from an optional pipe (pending forever on `None`; callers guard with `is_some`).
async fn read_some<R: AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Run `work` unless `cancel` fires first; dropping `work` drops the child, which kills it.
async fn cancellable<T>(
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = Result<T, SpeechError>>,
) -> Result<T, SpeechError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(SpeechError::Cancelled),
        r = work => r,
    }
}

/// The format of a WAV stream, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavHeader {
    pub rate_hz: u32,
    pub channels: u16,
    /// Bytes before the first sample.
    pub data_offset: usize,
    /// The data length, or `None` for a streaming placeholder (0 or 0xFFFFFFFF).
    pub data_bytes: Option<u64>,
}

/// Parse the header at the start of `b`: `Ok(None)` while more bytes are needed, an error when it is
/// not a 16-bit PCM WAV.
pub fn parse_wav_header(b: &[u8]) -> Result<Option<WavHeader>, String> {
    let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let magic_ok =
        b"RIFF".starts_with(&b[..b.len().min(4)]) && (b.len() < 12 || &b[8..12] == b"WAVE");
    if !magic_ok {
        return Err(format!(
            "not a WAV stream (starts with {:?})",
            String::from_utf8_lossy(&b[..b.len().min(12)])
        ));
    }
    if b.len() < 12 {
        return Ok(None);
    }
    let mut pos = 12;
    let mut format: Option<(u32, u16)> = None;
    loop {
        if pos > MAX_WAV_HEADER_BYTES {
            return Err(format!(
                "no data chunk in the first {MAX_WAV_HEADER_BYTES} bytes"
            ));
        }
        if b.len() < pos + 8 {
            return Ok(None);
        }
        let id = &b[pos..pos + 4];
        let size = le32(pos + 4);
        if id == b"data" {
            let (rate_hz, channels) = format.ok_or("data chunk before the fmt chunk")?;
            return Ok(Some(WavHeader {
                rate_hz,
                channels,
                data_offset: pos + 8,
                data_bytes: (size != 0 && size != u32::MAX).then_some(size as u64),
            }));
        }
        let body = pos + 8;
        let padded = size as usize + (size as usize & 1);
        if b.len() < body + padded {
            return Ok(None);
        }
        if id == b"fmt " {
            if size < 16 {
                return Err(format!("fmt chunk of {size} bytes"));
            }
            let tag = le16(body);
            let channels = le16(body + 2);
            let rate_hz = le32(body + 4);
            let bits = le16(body + 14);
            // WAVE_FORMAT_EXTENSIBLE: the sub-format GUID starts with the real tag.
            let pcm = tag == 1 || (tag == 0xFFFE && size >= 40 && le16(body + 24) == 1);
            if !pcm {
                return Err(format!(
                    "WAV format tag {tag:#06x}; hearken takes 16-bit PCM"
                ));
            }
            if bits != 16 {
                return Err(format!("{bits}-bit WAV; hearken takes 16-bit PCM"));
            }
            if !(1..=16).contains(&channels) || !(1_000..=384_000).contains(&rate_hz) {
                return Err(format!("WAV with {channels} channels at {rate_hz} Hz"));
            }
            format = Some((rate_hz, channels));
        }
        pos = body + padded;
    }
}

/// Turns a TTS program's stdout into mono chunks as it arrives.
#[derive(Debug)]
struct AudioDecoder {
    kind: StdoutAudio,
    /// WAV: the header bytes until it is complete.
    header: Vec<u8>,
    /// rate, channels once known.
    format: Option<(u32, usize)>,
    /// Data bytes still expected (WAV with a real length).
    remaining: Option<u64>,
    /// Part of a frame, waiting for the rest.
    carry: Vec<u8>,
}

impl AudioDecoder {
    fn new(kind: StdoutAudio) -> Self {
        AudioDecoder {
            kind,
            header: Vec::new(),
            format: match kind {
                StdoutAudio::Wav => None,
                StdoutAudio::Raw { rate_hz } => Some((rate_hz, 1)),
            },
            remaining: None,
            carry: Vec::new(),
        }
    }

    /// The audio in `bytes`, if a whole sample is there.
    fn push(&mut self, bytes: &[u8]) -> Result<Option<Pcm>, String> {
        let header;
        let mut bytes = bytes;
        if self.format.is_none() {
            self.header.extend_from_slice(bytes);
            let Some(h) = parse_wav_header(&self.header)? else {
                return Ok(None);
            };
            self.format = Some((h.rate_hz, h.channels as usize));
            self.remaining = h.data_bytes;
            // The samples that came with the end of the header.
            header = std::mem::take(&mut self.header);
            bytes = &header[h.data_offset..];
        }
        let Some((rate_hz, channels)) = self.format else {
            return Ok(None);
        };
        if let Some(rem) = self.remaining.as_mut() {
            let take = (*rem).min(bytes.len() as u64) as usize;
            *rem -= take as u64;
            bytes = &bytes[..take];
        }
        self.carry.extend_from_slice(bytes);
        let frame = 2 * channels;
        let whole = self.carry.len() / frame * frame;
        if whole == 0 {
            return Ok(None);
        }
        let samples = self.carry[..whole]
            .chunks_exact(frame)
            .map(|f| {
                let sum: i32 = f
                    .chunks_exact(2)
                    .map(|s| i16::from_le_bytes([s[0], s[1]]) as i32)
                    .sum();
                (sum / channels as i32) as i16
            })
            .collect();
        self.carry.drain(..whole);
        Ok(Some(Pcm { rate_hz, samples }))
    }

    /// At the end of the output: a WAV must at least have had its header.
    fn finish(&self) -> Result<(), String> {
        match (self.kind, self.format) {
            (StdoutAudio::Wav, None) => Err(format!(
                "output ended after {} bytes, before a complete WAV header",
                self.header.len()
            )),
            _ => Ok(()),
        }
    }
}

/// Text-to-speech by a local program: the text on its stdin, audio on its stdout, passed on in chunks
/// as the program writes them.
#[derive(Debug, Clone)]
pub struct CommandTts {
    program: Program,
    output: StdoutAudio,
    timeout: Duration,
}

impl CommandTts {
    /// `argv`: the program and its arguments, e.g. `["espeak-ng", "--stdout"]`.
    pub fn new(argv: Vec<String>, output: StdoutAudio) -> Self {
        CommandTts {
            program: Program::new(argv),
            output,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Longest wait for each next piece of output.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn run(
        &self,
        text: &str,
        out: &mpsc::Sender<Pcm>,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<SynthStats, SpeechError> {
        let p = &self.program;
        let mut run = p.spawn()?;
        let mut stdin = run.stdin.take();
        // A newline ends the text for programs that read it line by line (piper does).
        let input = format!("{}\n", text.trim_end());
        let feed = async {
            if let Some(mut pipe) = stdin.take() {
                pipe.write_all(input.as_bytes()).await?;
                // Dropping the pipe is the end of the text.
            }
            Ok::<(), std::io::Error>(())
        };
        tokio::pin!(feed);
        let mut fed = false;
        let mut decoder = AudioDecoder::new(self.output);
        let mut stats = SynthStats::default();
        let mut audio_us: u64 = 0;
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        let mut ebuf = [0u8; 1024];
        let idle = tokio::time::sleep(self.timeout);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                r = &mut feed, if !fed => {
                    fed = true;
                    // A program that takes its text from its arguments may not read stdin at all.
                    if let Err(e) = r {
                        debug!(service = %p.service, error = %e, "it did not read all of its input");
                    }
                }
                r = run.stdout.read(&mut buf) => {
                    let n = r.map_err(|e| p.failed(format!("reading its output: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    if let Some(pcm) = decoder.push(&buf[..n]).map_err(|m| p.protocol(m))? {
                        audio_us += pcm.samples.len() as u64 * 1_000_000 / pcm.rate_hz as u64;
                        // Playback's backpressure: no timeout while waiting for room.
                        let Ok(permit) = out.reserve().await else {
                            return Err(SpeechError::Cancelled);
                        };
                        if cancel.is_cancelled() {
                            return Err(SpeechError::Cancelled);
                        }
                        permit.send(pcm);
                        stats
                            .first_chunk_ms
                            .get_or_insert(started.elapsed().as_millis() as u64);
                    }
                    // From now, not from the read: waiting for room in `out` is not the program's delay.
                    idle.as_mut().reset(tokio::time::Instant::now() + self.timeout);
                }
                r = read_some(&mut run.stderr, &mut ebuf), if run.stderr.is_some() => {
                    run.take_stderr(r, &ebuf);
                }
                _ = &mut idle => {
                    let what = if stats.first_chunk_ms.is_none() {
                        "waiting for the first audio"
                    } else {
                        "waiting for more audio"
                    };
                    return Err(p.timed_out(what, self.timeout));
                }
            }
        }
        // The exit status first: a failed program explains itself better than its truncated output.
        p.finish(&mut run, self.timeout).await?;
        decoder.finish().map_err(|m| p.protocol(m))?;
        stats.audio_ms = audio_us / 1_000;
        Ok(stats)
    }
}

impl TextToSpeech for CommandTts {
    fn describe(&self) -> String {
        self.program.service.clone()
    }

    fn synthesize<'a>(
        &'a self,
        text: &'a str,
        out: mpsc::Sender<Pcm>,
        cancel: CancellationToken,
    ) -> SpeechFuture<'a, SynthStats> {
        Box::pin(async move {
            let started = Instant::now();
            if text.trim().is_empty() {
                return Ok(SynthStats::default());
            }
            cancellable(&cancel, self.run(text, &out, &cancel, started)).await
        })
    }
}

/// A 16-bit mono WAV of `samples`.
pub fn wav_bytes(rate_hz: u32, samples: &[i16]) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut w = Vec::with_capacity(44 + samples.len() * 2);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&rate_hz.to_le_bytes());
    w.extend_from_slice(&(rate_hz * 2).to_le_bytes()); // bytes per second
    w.extend_from_slice(&2u16.to_le_bytes()); // block align
    w.extend_from_slice(&16u16.to_le_bytes()); // bits
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        w.extend_from_slice(&s.to_le_bytes());
    }
    w
}

/// Speech-to-text by a local program: the whole turn on its stdin as a 16-bit mono WAV (written when
/// the turn is over, with its real length, so any WAV reader takes it), the text on its stdout.
#[derive(Debug, Clone)]
pub struct CommandStt {
    program: Program,
    timeout: Duration,
}

impl CommandStt {
    /// `argv`: the program and its arguments.
    pub fn new(argv: Vec<String>) -> Self {
        CommandStt {
            program: Program::new(argv),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// How long the program may take, from the end of the turn to its exit.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn run(
        &self,
        rate_hz: u32,
        mut audio: mpsc::Receiver<Vec<i16>>,
    ) -> Result<Transcript, SpeechError> {
        let p = &self.program;
        let max_samples = MAX_STT_SECONDS * rate_hz as usize;
        let mut samples: Vec<i16> = Vec::new();
        let mut dropped = 0usize;
        while let Some(chunk) = audio.recv().await {
            let room = max_samples.saturating_sub(samples.len());
            samples.extend_from_slice(&chunk[..chunk.len().min(room)]);
            dropped += chunk.len().saturating_sub(room);
        }
        if dropped > 0 {
            warn!(service = %p.service, dropped_samples = dropped, "turn longer than {MAX_STT_SECONDS} s; the rest was not transcribed");
        }
        if samples.is_empty() {
            return Ok(Transcript::default());
        }
        let wav = wav_bytes(rate_hz, &samples);
        drop(samples);

        let mut run = p.spawn()?;
        let mut stdin = run.stdin.take();
        let feed = async {
            if let Some(mut pipe) = stdin.take() {
                pipe.write_all(&wav).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        tokio::pin!(feed);
        let mut fed = false;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut text: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut ebuf = [0u8; 1024];
        loop {
            tokio::select! {
                r = &mut feed, if !fed => {
                    fed = true;
                    if let Err(e) = r {
                        debug!(service = %p.service, error = %e, "it did not read all of the audio");
                    }
                }
                r = run.stdout.read(&mut buf) => {
                    let n = r.map_err(|e| p.failed(format!("reading its output: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    let room = MAX_TRANSCRIPT_BYTES.saturating_sub(text.len());
                    text.extend_from_slice(&buf[..n.min(room)]);
                }
                r = read_some(&mut run.stderr, &mut ebuf), if run.stderr.is_some() => {
                    run.take_stderr(r, &ebuf);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(p.timed_out("waiting for the transcript", self.timeout));
                }
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        p.finish(&mut run, left).await?;
        // Programs print segments on separate lines; the transcript is one line of words.
        let text = String::from_utf8_lossy(&text)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Transcript {
            text,
            language: None,
        })
    }
}

impl SpeechToText for CommandStt {
    fn describe(&self) -> String {
        self.program.service.clone()
    }

    fn transcribe<'a>(
        &'a self,
        rate_hz: u32,
        audio: mpsc::Receiver<Vec<i16>>,
        cancel: CancellationToken,
    ) -> SpeechFuture<'a, Transcript> {
        Box::pin(async move { cancellable(&cancel, self.run(rate_hz, audio)).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(data_len: u32) -> Vec<u8> {
        let mut w = wav_bytes(22_050, &[]);
        w[40..44].copy_from_slice(&data_len.to_le_bytes());
        w
    }

    #[test]
    fn wav_header_incremental_and_placeholders() {
        let h = header(0x7FFF_F000);
        for n in 0..h.len() {
            assert_eq!(parse_wav_header(&h[..n]), Ok(None), "{n} bytes");
        }
        let got = parse_wav_header(&h).expect("valid").expect("complete");
        assert_eq!(
            got,
            WavHeader {
                rate_hz: 22_050,
                channels: 1,
                data_offset: 44,
                data_bytes: Some(0x7FFF_F000)
            }
        );
        for placeholder in [0, u32::MAX] {
            let got = parse_wav_header(&header(placeholder))
                .expect("ok")
                .expect("some");
            assert_eq!(got.data_bytes, None);
        }
    }

    #[test]
    fn wav_header_skips_other_chunks_and_refuses_other_formats() {
        // RIFF, WAVE, a LIST chunk of odd size (padded), fmt, data.
        let base = wav_bytes(16_000, &[1, 2]);
        let mut w = base[..12].to_vec();
        w.extend_from_slice(b"LIST");
        w.extend_from_slice(&3u32.to_le_bytes());
        w.extend_from_slice(b"abc\0");
        w.extend_from_slice(&base[12..]);
        let h = parse_wav_header(&w).expect("ok").expect("some");
        assert_eq!(
            (h.rate_hz, h.data_offset, h.data_bytes),
            (16_000, 56, Some(4))
        );

        let mut float = base.clone();
        float[20] = 3; // IEEE float
        assert!(parse_wav_header(&float).unwrap_err().contains("format tag"));
        let mut bits8 = base.clone();
        bits8[34] = 8;
        assert!(parse_wav_header(&bits8).unwrap_err().contains("8-bit"));
        assert!(
            parse_wav_header(b"ID3\x03")
                .unwrap_err()
                .contains("not a WAV")
        );
        assert!(
            parse_wav_header(b"RIFF\0\0\0\0AVI ")
                .unwrap_err()
                .contains("not a WAV")
        );
    }

    #[test]
    fn decoder_splits_and_honours_a_real_length() {
        // Stereo, a real length of 2 frames, then trailing junk that must be ignored.
        let mut w = wav_bytes(8_000, &[]);
        w[22] = 2; // channels
        w[40..44].copy_from_slice(&8u32.to_le_bytes());
        for s in [10i16, 20, -10, -30] {
            w.extend_from_slice(&s.to_le_bytes());
        }
        w.extend_from_slice(b"LIST\x04\0\0\0junk");
        let mut d = AudioDecoder::new(StdoutAudio::Wav);
        let mut got = Vec::new();
        // One byte at a time: header, frames and partial samples across reads.
        for b in &w {
            if let Some(pcm) = d.push(std::slice::from_ref(b)).expect("decodes") {
                assert_eq!(pcm.rate_hz, 8_000);
                got.extend(pcm.samples);
            }
        }
        assert_eq!(got, vec![15, -20]);
        assert!(d.finish().is_ok());

        let mut raw = AudioDecoder::new(StdoutAudio::Raw { rate_hz: 22_050 });
        assert_eq!(raw.push(&[1]).expect("ok"), None);
        let pcm = raw.push(&[0, 2, 0]).expect("ok").expect("samples");
        assert_eq!((pcm.rate_hz, pcm.samples), (22_050, vec![1, 2]));

        let mut short = AudioDecoder::new(StdoutAudio::Wav);
        assert_eq!(short.push(b"RIFF").expect("ok"), None);
        assert!(
            short
                .finish()
                .unwrap_err()
                .contains("before a complete WAV header")
        );
    }

    #[test]
    fn stderr_tail_keeps_the_last_lines() {
        let mut t = StderrTail::default();
        assert_eq!(t.describe(), "");
        for i in 0..1000 {
            t.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(
            t.describe(),
            "; stderr: line 995 | line 996 | line 997 | line 998 | line 999"
        );
        assert!(t.bytes.len() <= STDERR_TAIL_BYTES);
    }

    #[test]
    fn wav_bytes_is_a_valid_wav() {
        let w = wav_bytes(16_000, &[0, 1000, -1000]);
        let h = parse_wav_header(&w).expect("ok").expect("some");
        assert_eq!((h.rate_hz, h.channels, h.data_bytes), (16_000, 1, Some(6)));
        let mut r = hound::WavReader::new(std::io::Cursor::new(w)).expect("hound reads it");
        let s: Vec<i16> = r.samples::<i16>().map(|x| x.expect("sample")).collect();
        assert_eq!(s, vec![0, 1000, -1000]);
    }
}
