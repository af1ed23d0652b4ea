"""Kaldi fbank in JAX (colearn_jax/data/audio.py) vs torchaudio.compliance.kaldi.fbank, as ImageBind's
`waveform2melspec` calls it. torchaudio runs in a subprocess from /work/.ta_env (or $COLEARN_TORCHAUDIO_DIR)
because it pins its own torch; the test is skipped when that directory is absent."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colearn_jax.data import audio

TA_DIR = os.environ.get("COLEARN_TORCHAUDIO_DIR", "/work/.ta_env")

REFERENCE = r"""
import sys, json, numpy as np, torch
import torchaudio.compliance.kaldi as kaldi
wav = np.load(sys.argv[1])
out = []
for w in list(wav) + list(wav.astype(np.float64)):
    w = torch.tensor(w[None, :])
    w = w - w.mean()
    fb = kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                     num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10)
    fb = fb.transpose(0, 1)
    p = 204 - fb.shape[1]
    fb = torch.nn.functional.pad(fb, (0, p)) if p > 0 else fb[:, :204]
    out.append(((fb - (-4.268)) / 9.138).numpy())
np.save(sys.argv[2], np.stack(out))
"""


def _waves():
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(32000)
    noise = 0.5 * rng.standard_normal(32000)
    chirp = 0.4 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.1
    return np.stack([tone, noise, chirp]).astype(np.float32)


@pytest.mark.skipif(not os.path.isdir(TA_DIR), reason=f"torchaudio not installed in {TA_DIR}")
def test_fbank_matches_torchaudio(tmp_path):
    wav = _waves()
    np.save(tmp_path / "w.npy", wav)
    env = {**os.environ, "PYTHONPATH": TA_DIR, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", REFERENCE, str(tmp_path / "w.npy"), str(tmp_path / "r.npy")],
                   check=True, env=env, timeout=120)
    ref32, ref64 = np.split(np.load(tmp_path / "r.npy"), 2)
    ours = np.asarray(audio.waveform_to_melspec(wav))
    with jax.enable_x64(True):
        ours64 = np.asarray(audio.waveform_to_melspec(jnp.asarray(wav, jnp.float64)))
    assert ours.shape == ref32.shape == (3, 128, 204) and ours64.dtype == np.float64
    # The algorithm: in float64 both agree to 1e-4 everywhere (normalised units).
    err64 = np.max(np.abs(ours64 - ref64))
    # float32: equal within 60 dB of each frame's loudest mel bin. Below that (the lowest bins, cut ~30 dB by
    # pre-emphasis, of quiet frames) energies sit at float32's FFT noise floor, where any two float32 FFTs differ.
    log_e = ref64 * audio.MEL_STD + audio.MEL_MEAN
    audible = log_e > log_e.max(axis=1, keepdims=True) - 6.0 * np.log(10.0)
    err32 = np.max(np.abs(ours - ref32)[audible])
    noise_ours, noise_torch = np.max(np.abs(ours - ref64)), np.max(np.abs(ref32 - ref64))
    print(f"fbank vs torchaudio: f64 {err64:.2e}; f32 within 60 dB of the frame peak ({audible.mean():.1%} of bins) "
          f"{err32:.2e}; f32 vs f64 everywhere: ours {noise_ours:.2e}, torchaudio {noise_torch:.2e}")
    assert err64 < 1e-4 and err32 < 1e-4 and audible.mean() > 0.6
    assert noise_ours < 2 * noise_torch + 1e-5  # no worse than torchaudio's own float32 rounding
    np.testing.assert_allclose(ours[:, :, 198:], -audio.MEL_MEAN / audio.MEL_STD, rtol=1e-6)  # 198 frames + zero pad


def test_clips_and_framing():
    assert audio.num_frames(32000) == 198 and audio.num_frames(399) == 0
    assert audio.clip_starts(32000) == [0, 0, 0]
    assert audio.clip_starts(16000 * 5) == [0, 24000, 48000]  # (5 - 2) / 2 s apart
    wav = np.random.default_rng(1).standard_normal((2, 16000 * 5)).astype(np.float32)
    mel = np.asarray(audio.clips_to_melspec(wav))
    assert mel.shape == (2, 3, 1, 128, 204)
    np.testing.assert_allclose(mel[:, 1, 0], np.asarray(audio.waveform_to_melspec(wav[:, 24000:56000])), atol=1e-5)
    banks = audio.mel_banks(128, 512, 16000.0)
    # 128 Kaldi filters over 256 FFT bins: filter 3 (around 70 Hz) falls between two bins and is empty, as in Kaldi
    assert banks.shape == (257, 128) and np.all(banks[-1] == 0) and list(np.flatnonzero(banks.max(0) == 0)) == [3]
