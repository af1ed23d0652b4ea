"""Readers (and writers, for tests and exports) of the real file formats behind ImageBind's modalities
(Girdhar et al. 2023, Sec. 4): WAV audio, 16-bit depth PNGs (SUN RGB-D / NYU style, millimetres) turned
into disparity, and IMU recordings as CSV (Ego4D-style 6 channels: accelerometer xyz, gyroscope xyz).
They produce what `digit_modalities` stores, so real files can feed the same pipeline and model.
No soundfile / torchaudio: WAV goes through Python's `wave` module.
"""
from __future__ import annotations

import wave

import numpy as np

from colearn_jax.data import audio as _audio

IMU_COLUMNS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")


# ----------------------------------------------------------------------------- audio
def write_wav(path, samples: np.ndarray, sample_rate: int = _audio.SAMPLE_RATE) -> None:
    """int16 [n] (mono) or [n, channels] PCM to a WAV file."""
    x = np.asarray(samples)
    if x.dtype != np.int16:
        raise ValueError(f"write_wav wants int16 PCM, got {x.dtype}.")
    channels = 1 if x.ndim == 1 else x.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(x.astype("<i2").tobytes())


def read_wav(path, target_rate: int | None = _audio.SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """A PCM WAV (8/16/32-bit) -> (mono float32 in [-1, 1), rate). Channels are averaged; with
    `target_rate` the audio is resampled (band-limited, via FFT) to it, as the reference resamples to 16 kHz."""
    with wave.open(str(path), "rb") as w:
        channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{path}: {8 * width}-bit WAV is not supported (8, 16 or 32-bit PCM).")
    x = x.reshape(-1, channels).mean(axis=1)
    if target_rate and rate != target_rate:
        x, rate = resample(x, rate, target_rate), target_rate
    return x.astype(np.float32), rate


def resample(x: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling by zero-padding / truncating the spectrum."""
    n_out = int(round(len(x) * target_rate / rate))
    spec = np.fft.rfft(x)
    out = np.zeros(n_out // 2 + 1, complex)
    k = min(len(spec), len(out))
    out[:k] = spec[:k]
    return np.fft.irfft(out, n_out) * (n_out / len(x))


# ----------------------------------------------------------------------------- depth
def write_depth_png(path, depth_m: np.ndarray, scale: float = 1000.0) -> None:
    """Depth in metres [H, W] -> 16-bit PNG in units of 1/scale m (millimetres by default); 0 = invalid."""
    from PIL import Image  # noqa: PLC0415

    mm = np.clip(np.round(np.asarray(depth_m, np.float64) * scale), 0, 65535).astype(np.uint16)
    Image.fromarray(mm).save(str(path))


def read_depth_png(path, scale: float = 1000.0) -> np.ndarray:
    """16-bit depth PNG (1/scale m units) -> depth in metres [H, W] float32 (0 where invalid)."""
    from PIL import Image  # noqa: PLC0415

    raw = np.asarray(Image.open(str(path)))
    if raw.dtype not in (np.uint16, np.int32, np.uint32, np.int16):
        raise ValueError(f"{path}: expected a 16-bit depth PNG, got {raw.dtype} {raw.shape}.")
    return raw.astype(np.float32) / scale


def depth_to_disparity(depth_m: np.ndarray, min_depth: float = 0.1) -> np.ndarray:
    """Disparity 1/depth (1/m) [H, W, 1]; invalid (0) or nearer-than-`min_depth` pixels get 0."""
    d = np.asarray(depth_m, np.float32)
    disp = np.where(d >= min_depth, 1.0 / np.maximum(d, min_depth), 0.0).astype(np.float32)
    return disp[..., None] if disp.ndim == 2 else disp


def read_depth_png_as_disparity(path, scale: float = 1000.0) -> np.ndarray:
    return depth_to_disparity(read_depth_png(path, scale))


# ----------------------------------------------------------------------------- IMU
def write_imu_csv(path, imu: np.ndarray, rate: float = 200.0) -> None:
    """[6, T] -> CSV with a header `t,acc_x,...,gyro_z` (t in seconds)."""
    imu = np.asarray(imu, np.float64)
    t = np.arange(imu.shape[1]) / rate
    np.savetxt(str(path), np.column_stack([t, imu.T]), delimiter=",", header="t," + ",".join(IMU_COLUMNS),
               comments="", fmt="%.6g")


def read_imu_csv(path, length: int = 2000) -> np.ndarray:
    """CSV with (optionally a `t` column and) the six IMU columns by name -> float32 [6, length]
    (cropped or zero-padded at the end, as the model takes fixed 2000-sample windows)."""
    with open(path) as f:
        header = f.readline().strip().split(",")
    missing = [c for c in IMU_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}: IMU CSV lacks columns {missing}; header is {header}.")
    data = np.loadtxt(str(path), delimiter=",", skiprows=1, ndmin=2)
    imu = data[:, [header.index(c) for c in IMU_COLUMNS]].T.astype(np.float32)
    if imu.shape[1] < length:
        imu = np.pad(imu, [(0, 0), (0, length - imu.shape[1])])
    return imu[:, :length]
