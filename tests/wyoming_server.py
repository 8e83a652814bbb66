#!/usr/bin/env python3
"""A real Wyoming server for hearken's speech tests (tests/speech.rs).

Built on the official `wyoming` package (AsyncServer / AsyncEventHandler, the same code the
wyoming-piper and wyoming-faster-whisper services run on), so hearken's client is checked against
the protocol as that library writes and reads it:

- TTS by espeak-ng: `synthesize` runs espeak-ng, its WAV stream goes out as audio-start, one
  audio-chunk per 1024 samples as espeak-ng writes them, audio-stop. An espeak-ng failure (an unknown
  voice) is answered with an `error` event carrying its stderr.
- STT by pocketsphinx (its bundled US English model): each audio-chunk is converted to 16 kHz mono
  16-bit as it arrives and kept; audio-stop decodes the whole utterance (as wyoming-faster-whisper
  does; pocketsphinx is also more accurate with the utterance's own normalisation than live) and
  answers `transcript`.

The tests read this process's stdout, one report per line: `READY`, `STT first-chunk`,
`TRANSCRIPT <text>`, `SYNTH done <chunks>`, `SYNTH aborted <chunks>` (the client went away mid-stream;
espeak-ng is killed). The server exits when its stdin closes, so it never outlives the test process.

Usage: wyoming_server.py --uri tcp://127.0.0.1:PORT [--espeak espeak-ng] [--voice en-us] [--speed 130]
"""

import argparse
import asyncio
import os
import struct
import sys
import threading
from functools import partial

from pocketsphinx import Decoder
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    Describe,
    Info,
    TtsProgram,
    TtsVoice,
)
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.tts import Synthesize

SAMPLES_PER_CHUNK = 1024


def report(*words: object) -> None:
    print(*words, flush=True)


def make_info(args: argparse.Namespace) -> Info:
    espeak = Attribution(name="eSpeak NG", url="https://github.com/espeak-ng/espeak-ng")
    cmu = Attribution(name="CMU Sphinx", url="https://github.com/cmusphinx/pocketsphinx")
    return Info(
        asr=[
            AsrProgram(
                name="pocketsphinx",
                description="PocketSphinx with its bundled US English model",
                attribution=cmu,
                installed=True,
                version="5",
                models=[
                    AsrModel(
                        name="en-us",
                        description="CMU US English",
                        attribution=cmu,
                        installed=True,
                        version=None,
                        languages=["en"],
                    )
                ],
            )
        ],
        tts=[
            TtsProgram(
                name="espeak-ng",
                description="eSpeak NG through its --stdout WAV stream",
                attribution=espeak,
                installed=True,
                version=None,
                voices=[
                    TtsVoice(
                        name=name,
                        description=None,
                        attribution=espeak,
                        installed=True,
                        version=None,
                        languages=[lang],
                    )
                    for name, lang in [("en-us", "en-us"), ("en-us+m1", "en-us"), ("en", "en")]
                ],
            )
        ],
    )


async def read_wav_header(stream: asyncio.StreamReader) -> tuple:
    """(rate, width, channels) from a streaming WAV header; the stream is left at the first sample."""
    riff = await stream.readexactly(12)
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise ValueError("espeak-ng did not write a WAV")
    fmt = None
    while True:
        chunk_id, size = struct.unpack("<4sI", await stream.readexactly(8))
        if chunk_id == b"data":
            if fmt is None:
                raise ValueError("WAV data before fmt")
            return fmt
        body = await stream.readexactly(size + (size & 1))
        if chunk_id == b"fmt ":
            _tag, channels, rate, _bps, _align, bits = struct.unpack("<HHIIHH", body[:16])
            fmt = (rate, bits // 8, channels)


class Handler(AsyncEventHandler):
    def __init__(self, args, info, decoder, decoder_lock, *rest, **kw) -> None:
        super().__init__(*rest, **kw)
        self.args = args
        self.info = info
        self.decoder = decoder
        self.decoder_lock = decoder_lock
        self.converter = AudioChunkConverter(rate=16000, width=2, channels=1)
        self.decoding = False
        self.chunks_in = 0
        self.audio = []

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(self.info.event())
        elif Transcribe.is_type(event.type):
            pass  # one model, one language
        elif AudioStart.is_type(event.type):
            if self.decoding:
                self.decoder.end_utt()  # a new stream replaces an unfinished one
            else:
                await self.decoder_lock.acquire()
                self.decoding = True
            self.chunks_in = 0
            self.audio = []
            self.decoder.start_utt()
        elif AudioChunk.is_type(event.type):
            if not self.decoding:
                await self.write_event(Error(text="audio-chunk before audio-start").event())
                return True
            chunk = self.converter.convert(AudioChunk.from_event(event))
            self.chunks_in += 1
            if self.chunks_in == 1:
                report("STT first-chunk")
            self.audio.append(chunk.audio)
        elif AudioStop.is_type(event.type):
            if self.decoding:
                self.decoder.process_raw(b"".join(self.audio), False, True)
                self.decoder.end_utt()
                hyp = self.decoder.hyp()
                text = hyp.hypstr if hyp is not None else ""
                self.release()
                report("TRANSCRIPT", text)
                await self.write_event(Transcript(text=text, language="en").event())
        elif Synthesize.is_type(event.type):
            # False ends this connection: the client went away mid-stream.
            return await self.synthesize(Synthesize.from_event(event))
        return True

    def release(self) -> None:
        if self.decoding:
            self.decoding = False
            self.decoder_lock.release()

    async def disconnect(self) -> None:
        if self.decoding:
            self.decoder.end_utt()
        self.release()

    async def synthesize(self, request: Synthesize) -> bool:
        voice = request.voice.name if request.voice and request.voice.name else self.args.voice
        proc = await asyncio.create_subprocess_exec(
            self.args.espeak, "-v", voice, "-s", str(self.args.speed), "--stdout",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        proc.stdin.write(request.text.encode() + b"\n")
        proc.stdin.close()
        chunks = 0
        try:
            try:
                rate, width, channels = await read_wav_header(proc.stdout)
            except (asyncio.IncompleteReadError, ValueError):
                stderr = (await proc.stderr.read()).decode(errors="replace").strip()
                await proc.wait()
                await self.write_event(
                    Error(text=f"espeak-ng failed: {stderr}", code="tts-failed").event()
                )
                return True
            await self.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
            frame = width * channels
            want = SAMPLES_PER_CHUNK * frame
            pending = b""
            while True:
                data = await proc.stdout.read(want)
                if not data:
                    break
                pending += data
                whole = len(pending) // frame * frame
                if whole == 0:
                    continue
                audio, pending = pending[:whole], pending[whole:]
                await self.write_event(
                    AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event()
                )
                chunks += 1
            await proc.wait()
            await self.write_event(AudioStop().event())
            report("SYNTH done", chunks)
            return True
        except ConnectionError:
            report("SYNTH aborted", chunks)
            return False
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def exit_when_stdin_closes() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--espeak", default="espeak-ng")
    parser.add_argument("--voice", default="en-us")
    parser.add_argument("--speed", type=int, default=130)
    args = parser.parse_args()

    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    decoder = Decoder(samprate=16000, loglevel="FATAL")
    decoder_lock = asyncio.Lock()
    info = make_info(args)
    server = AsyncServer.from_uri(args.uri)
    await server.start(partial(Handler, args, info, decoder, decoder_lock))
    report("READY")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
