//! Earcons: the short sounds that tell the user what the device is doing. They play through the same
//! playback path as the agent's voice (so a flush silences them too). Built in from `audio/earcons/`, or
//! loaded from `[earcons] dir`. Loaded once at start-up, as 16 kHz mono f32; the DSP worker converts them
//! to the output device's format when it opens the device.

use std::io::Cursor;
use std::path::Path;

use super::DeviceError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Earcon {
    /// The device is ready to listen (start-up, reconnected).
    Listening,
    /// The user's turn was taken (end of turn).
    Done,
    /// Something failed (no answer in time, agent error).
    Error,
    /// The agent is working (a tool call); may repeat.
    Working,
    /// A spoken "One moment." for a tool call that runs long.
    ToolNotice,
}

impl Earcon {
    pub const ALL: [Earcon; 5] = [
        Earcon::Listening,
        Earcon::Done,
        Earcon::Error,
        Earcon::Working,
        Earcon::ToolNotice,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Earcon::Listening => "listening.wav",
            Earcon::Done => "done.wav",
            Earcon::Error => "error.wav",
            Earcon::Working => "working.wav",
            Earcon::ToolNotice => "tool_notice.wav",
        }
    }

    fn builtin(self) -> &'static [u8] {
        match self {
            Earcon::Listening => include_bytes!("../../audio/earcons/listening.wav"),
            Earcon::Done => include_bytes!("../../audio/earcons/done.wav"),
            Earcon::Error => include_bytes!("../../audio/earcons/error.wav"),
            Earcon::Working => include_bytes!("../../audio/earcons/working.wav"),
            Earcon::ToolNotice => include_bytes!("../../audio/earcons/tool_notice.wav"),
        }
    }
}

/// A decoded sound: mono f32 at `rate_hz`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sound {
    pub rate_hz: u32,
    pub samples: Vec<f32>,
}

/// The four earcons, decoded.
#[derive(Debug, Clone)]
pub struct Earcons {
    sounds: [Sound; 5],
}

impl Earcons {
    /// Load from `dir` (each file falls back to the built-in one when absent), or all built-in when
    /// `dir` is empty. `volume` scales them.
    pub fn load(dir: &str, volume: f32) -> Result<Self, DeviceError> {
        let load_one = |e: Earcon| -> Result<Sound, DeviceError> {
            let mut s = if dir.is_empty() || !Path::new(dir).join(e.file_name()).exists() {
                decode_wav(Cursor::new(e.builtin()), e.file_name())?
            } else {
                let path = Path::new(dir).join(e.file_name());
                let bytes = std::fs::read(&path).map_err(|err| DeviceError::WavFormat {
                    path: path.display().to_string(),
                    message: err.to_string(),
                })?;
                decode_wav(Cursor::new(bytes), &path.display().to_string())?
            };
            s.samples.iter_mut().for_each(|x| *x *= volume);
            Ok(s)
        };
        Ok(Earcons {
            sounds: [
                load_one(Earcon::Listening)?,
                load_one(Earcon::Done)?,
                load_one(Earcon::Error)?,
                load_one(Earcon::Working)?,
                load_one(Earcon::ToolNotice)?,
            ],
        })
    }

    pub fn get(&self, e: Earcon) -> &Sound {
        &self.sounds[e as usize]
    }
}

/// Decode a WAV (any integer or float format) to mono f32 (channels averaged).
pub fn decode_wav<R: std::io::Read>(r: R, name: &str) -> Result<Sound, DeviceError> {
    let mut reader = hound::WavReader::new(r).map_err(|source| DeviceError::Wav {
        path: name.to_string(),
        source,
    })?;
    let spec = reader.spec();
    let wav_err = |source| DeviceError::Wav {
        path: name.to_string(),
        source,
    };
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(wav_err)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(wav_err)?
        }
    };
    let ch = spec.channels.max(1) as usize;
    let samples = interleaved
        .chunks(ch)
        .map(|f| f.iter().sum::<f32>() / ch as f32)
        .collect();
    Ok(Sound {
        rate_hz: spec.sample_rate,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_earcons_decode_and_scale() {
        let full = Earcons::load("", 1.0).expect("built-in");
        let half = Earcons::load("", 0.5).expect("built-in");
        for e in Earcon::ALL {
            let s = full.get(e);
            assert_eq!(s.rate_hz, 16_000, "{e:?}");
            assert!(s.samples.len() > 16_000 / 100, "{e:?} too short");
            let peak = s.samples.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            // Tones at -12 dBFS, the spoken notice at -6 dBFS.
            assert!(peak > 0.1 && peak < 0.6, "{e:?} peak {peak}");
            let hpeak = half
                .get(e)
                .samples
                .iter()
                .fold(0.0f32, |m, x| m.max(x.abs()));
            assert!((hpeak - peak / 2.0).abs() < 1e-3);
        }
    }
}
