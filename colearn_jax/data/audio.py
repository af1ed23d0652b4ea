"""Kaldi-compatible log-mel filterbanks in JAX: ImageBind's audio input (Girdhar et al. 2023, Sec. 4
"Audio"; the reference's `imagebind/data.py:waveform2melspec`, after AST, Gong et al. 2021).

The reference computes, per 2 s clip of 16 kHz mono audio (3 clips spread over the file):
waveform -= mean; `torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False,
window_type="hanning", num_mel_bins=128, dither=0, frame_length=25, frame_shift=10)`; pad with zeros
or crop to 204 frames; normalise with mean -4.268, std 9.138; layout [1, mel, frames].

Kaldi's fbank, as torchaudio implements it (snip_edges=True, the defaults otherwise): frames of 400
samples every 160; each frame minus its mean (remove_dc_offset); pre-emphasis 0.97 (x[j] -= 0.97
x[j-1], x[-1] := x[0]); symmetric Hann window 0.5 - 0.5 cos(2 pi n / (N - 1)); zero-padded to 512;
power spectrum |rfft|^2; triangular HTK-mel filters (mel = 1127 ln(1 + f/700), 20 Hz .. Nyquist,
over the first 256 FFT bins); log(max(energy, float32 eps)).

Everything here is jittable (`kaldi_fbank`, `waveform_to_melspec`, `clips_to_melspec`), so the
pipeline can ship raw int16 waveforms and compute the features on the device inside the step.
tests/test_audio.py compares with torchaudio 2.11 to 1e-4.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
TARGET_LENGTH = 204  # frames per clip (2 s -> 198 frames, zero-padded)
CLIP_DURATION = 2.0  # seconds
CLIPS_PER_AUDIO = 3
MEL_MEAN, MEL_STD = -4.268, 9.138
FRAME_LENGTH_MS, FRAME_SHIFT_MS = 25.0, 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
EPS = float(np.finfo(np.float32).eps)


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = LOW_FREQ,
              high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters, [padded_window // 2 + 1, num_bins] (last FFT bin weight 0)."""
    nyquist = 0.5 * sample_rate
    high = high_freq + nyquist if high_freq <= 0 else high_freq
    mel_low, mel_high = _mel(low_freq), _mel(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]
    left, centre, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel((sample_rate / padded_window) * np.arange(padded_window // 2))[None, :]
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(up, down))  # [num_bins, padded/2]
    banks = np.concatenate([banks, np.zeros((num_bins, 1))], axis=1)
    return banks.T  # float64; cast to the waveform's dtype by the caller


def _frame_params(sample_rate: float):
    size = int(sample_rate * FRAME_LENGTH_MS * 0.001)
    shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
    return size, shift, 1 << (size - 1).bit_length()


def num_frames(num_samples: int, sample_rate: float = SAMPLE_RATE) -> int:
    size, shift, _ = _frame_params(sample_rate)
    return 0 if num_samples < size else 1 + (num_samples - size) // shift


def kaldi_fbank(waveform: jax.Array, sample_rate: float = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS) -> jax.Array:
    """[..., samples] float waveform -> [..., frames, num_mel_bins] log-mel energies (Kaldi, no dither)."""
    size, shift, padded = _frame_params(sample_rate)
    n = waveform.shape[-1]
    m = num_frames(n, sample_rate)
    if m == 0:
        raise ValueError(f"kaldi_fbank: {n} samples is shorter than one {size}-sample frame.")
    x = waveform.astype(jnp.result_type(waveform.dtype, jnp.float32))  # float64 stays float64 under x64
    idx = np.arange(m)[:, None] * shift + np.arange(size)[None, :]
    frames = x[..., idx]  # [..., m, size]
    frames = frames - jnp.mean(frames, axis=-1, keepdims=True)
    prev = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = frames - PREEMPHASIS * prev
    window = 0.5 - 0.5 * np.cos(2 * math.pi * np.arange(size) / (size - 1))
    frames = frames * jnp.asarray(window, x.dtype)
    frames = jnp.pad(frames, [(0, 0)] * (frames.ndim - 1) + [(0, padded - size)])
    spec = jnp.fft.rfft(frames, axis=-1)
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    energies = jnp.einsum("...f,fb->...b", power, jnp.asarray(mel_banks(num_mel_bins, padded, float(sample_rate)), x.dtype),
                          precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(energies, EPS))  # Kaldi floors at float32 eps whatever the dtype


def waveform_to_melspec(waveform: jax.Array, sample_rate: float = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS,
                        target_length: int = TARGET_LENGTH, normalize: bool = True) -> jax.Array:
    """One clip [..., samples] -> [..., num_mel_bins, target_length] (reference `waveform2melspec` +
    normalisation): mean-subtracted waveform, fbank, transposed, zero-padded / cropped in time."""
    x = waveform.astype(jnp.result_type(waveform.dtype, jnp.float32))
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    fb = jnp.swapaxes(kaldi_fbank(x, sample_rate, num_mel_bins), -1, -2)  # [..., mel, frames]
    frames = fb.shape[-1]
    if frames < target_length:
        fb = jnp.pad(fb, [(0, 0)] * (fb.ndim - 1) + [(0, target_length - frames)])
    else:
        fb = fb[..., :target_length]
    if normalize:
        fb = (fb - MEL_MEAN) / MEL_STD
    return fb


def clip_starts(num_samples: int, sample_rate: float = SAMPLE_RATE, clip_duration: float = CLIP_DURATION,
                clips: int = CLIPS_PER_AUDIO) -> list[int]:
    """Sample offsets of `clips` clips spread evenly from the start to the end of the audio, as
    pytorchvideo's ConstantClipsPerVideoSampler gives them to the reference (start_k = k (D - d) / (n - 1))."""
    duration = num_samples / sample_rate
    span = max(duration - clip_duration, 0.0)
    step = span / max(clips - 1, 1)
    return [int(k * step * sample_rate) for k in range(clips)]


def clips_to_melspec(waveform: jax.Array, sample_rate: float = SAMPLE_RATE, clip_duration: float = CLIP_DURATION,
                     clips: int = CLIPS_PER_AUDIO, num_mel_bins: int = NUM_MEL_BINS,
                     target_length: int = TARGET_LENGTH) -> jax.Array:
    """[batch, samples] waveform -> [batch, clips, 1, num_mel_bins, target_length], normalised."""
    n = waveform.shape[-1]
    length = min(int(clip_duration * sample_rate), n)
    pieces = [waveform[..., s:s + length] for s in clip_starts(n, sample_rate, clip_duration, clips)]
    mel = waveform_to_melspec(jnp.stack(pieces, axis=-2), sample_rate, num_mel_bins, target_length)
    return mel[..., None, :, :]


def int16_to_float(x) -> jax.Array:
    """PCM int16 -> float in [-1, 1) (torchaudio.load's normalisation)."""
    return jnp.asarray(x).astype(jnp.float32) / 32768.0
