"""`digit_modalities`: every scikit-learn handwritten digit paired with audio, depth, thermal, IMU and a
caption - a local, download-free stand-in for ImageBind's image-paired datasets (Girdhar et al. 2023,
Sec. 3.2 and 4: AudioSet (video+audio), SUN RGB-D (image+depth), LLVIP (image+thermal), Ego4D
(video+IMU)). Built on first use, like `digits_captions`.

Data card
---------
Source: the 1797 8x8 digits bundled with scikit-learn, split as `digits_captions` (1497 train / 300
test, stratified, so test handwriting is unseen). Each example is a pure function of (SEED, index).
  image    uint8 [32,32,3]  the digit, upscaled bicubically (= digits_captions' image)
  audio    int16 [32000]    2 s of 16 kHz mono PCM: a class-dependent "spoken" pattern - 1-4 syllables
                            (count = 1 + label % 4) of two formant-like tones per class, with a random
                            pitch factor (x0.85-1.15), tempo (x0.8-1.25), onset, loudness and noise (SNR
                            10-30 dB)
  depth    float32 [32,32,1] disparity (1/metres) of the digit as a raised relief (ink height up to 4 cm)
                            on a plane 0.8-1.6 m away, tilted by up to +-3 cm across, with depth noise; ImageBind feeds
                            disparity (its Sec. 4 "depth ... converted to disparity")
  thermal  uint8 [32,32,1]  a heat image: warm ink on a cooler background, blurred (sigma 0.8-1.6 px),
                            with gain/offset jitter, column fixed-pattern noise and sensor noise
  imu      float16 [6,2000] accelerometer xyz (m/s^2, gravity included) and gyroscope xyz (rad/s) of a
                            pen writing the digit: a per-class stroke template, jittered per example,
                            time-warped (tempo), plus pen tilt following the stroke direction and noise
  caption  text             "the number seven", "a handwritten 7", ... (one template per example)
  label    ClassLabel       0-9;  id int64: the sklearn index
The pairing is at class level plus per-example nuisance (as with a different recording of the same
word): a modality tells the digit, not which handwriting. ~115 KB per example (~200 MB in all).
`modality_io` reads the real formats (WAV, 16-bit depth PNG, IMU CSV) into these representations.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from colearn_jax.data import build_lock
from colearn_jax.data import digits as _digits

NAME = "digit_modalities"
SEED = 2023
SAMPLE_RATE = 16000
AUDIO_SECONDS = 2.0
AUDIO_SAMPLES = int(SAMPLE_RATE * AUDIO_SECONDS)
IMU_CHANNELS, IMU_LENGTH = 6, 2000
IMU_RATE = 200.0  # Hz: 2000 samples = 10 s
IMAGE_SIZE = _digits.IMAGE_SIZE
CLASS_NAMES = _digits.CLASS_NAMES
MODALITIES = ("audio", "depth", "thermal", "imu")
CAPTION_TEMPLATES = ("the number {word}", "a handwritten {num}", "the digit {word}", "a drawing of a {word}")

# Two formant-like frequencies (Hz) per class, spread so that every class has its own pair.
FORMANTS = tuple((300.0 + 70.0 * d, 1100.0 + 230.0 * ((3 * d) % 10)) for d in range(10))

# Pen strokes per class in a unit square (y up), one polyline each (pen-up moves are not modelled).
_STROKES = {
    1: [(0.35, 0.8), (0.5, 1.0), (0.5, 0.0)],
    2: [(0.2, 0.75), (0.35, 0.95), (0.65, 0.95), (0.8, 0.75), (0.2, 0.0), (0.8, 0.0)],
    3: [(0.2, 0.9), (0.8, 0.9), (0.45, 0.55), (0.8, 0.35), (0.7, 0.05), (0.2, 0.1)],
    4: [(0.6, 0.0), (0.6, 1.0), (0.15, 0.35), (0.85, 0.35)],
    5: [(0.8, 1.0), (0.25, 1.0), (0.2, 0.55), (0.7, 0.55), (0.8, 0.25), (0.6, 0.0), (0.2, 0.05)],
    6: [(0.7, 1.0), (0.3, 0.6), (0.2, 0.25), (0.45, 0.0), (0.75, 0.2), (0.65, 0.45), (0.25, 0.4)],
    7: [(0.15, 1.0), (0.85, 1.0), (0.4, 0.0)],
    9: [(0.8, 0.7), (0.5, 0.95), (0.2, 0.75), (0.35, 0.5), (0.8, 0.7), (0.75, 0.0)],
}


def _template(label: int) -> np.ndarray:
    """[k, 2] stroke waypoints of a class (0 and 8 are parametric curves)."""
    if label == 0:
        t = np.linspace(0, 2 * np.pi, 24)
        return np.stack([0.5 - 0.3 * np.sin(t), 0.5 + 0.45 * np.cos(t)], 1)
    if label == 8:
        t = np.linspace(0, 2 * np.pi, 32)
        return np.stack([0.5 + 0.3 * np.sin(2 * t) / 1.2, 0.5 + 0.45 * np.cos(t)], 1)
    return np.asarray(_STROKES[label], np.float64)


def synth_audio(label: int, rng: np.random.Generator) -> np.ndarray:
    """2 s int16 PCM of the class's syllable pattern with random pitch, tempo, onset, level and noise."""
    t = np.arange(AUDIO_SAMPLES) / SAMPLE_RATE
    pitch = rng.uniform(0.85, 1.15)
    tempo = rng.uniform(0.8, 1.25)
    syllables = 1 + label % 4
    dur, gap = 0.22 / tempo, 0.12 / tempo
    start = rng.uniform(0.05, max(0.06, AUDIO_SECONDS - syllables * (dur + gap) - 0.05))
    f1, f2 = FORMANTS[label]
    x = np.zeros_like(t)
    for k in range(syllables):
        s = start + k * (dur + gap)
        inside = (t >= s) & (t < s + dur)
        u = (t[inside] - s) / dur
        env = np.sin(np.pi * u) ** 2
        glide = 1.0 + 0.08 * (u - 0.5) * (1 if label % 2 else -1)  # rising / falling syllables
        phase1 = 2 * np.pi * f1 * pitch * glide * (t[inside] - s)
        phase2 = 2 * np.pi * f2 * pitch * (t[inside] - s)
        x[inside] += env * (np.sin(phase1) + 0.6 * np.sin(phase2) + 0.25 * np.sin(2 * phase1))
    x *= rng.uniform(0.2, 0.5) / max(np.max(np.abs(x)), 1e-6)
    snr_db = rng.uniform(10.0, 30.0)
    noise = rng.standard_normal(t.shape) * np.sqrt(np.mean(x**2) / 10 ** (snr_db / 10))
    return np.clip(np.round((x + noise) * 32767), -32768, 32767).astype(np.int16)


def _ink(image: np.ndarray) -> np.ndarray:
    return image[..., 0].astype(np.float64) / 255.0  # [S, S] in [0, 1]


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.apply_along_axis(lambda v: np.convolve(np.pad(v, r, mode="edge"), k, "valid"), 0, x)
    return np.apply_along_axis(lambda v: np.convolve(np.pad(v, r, mode="edge"), k, "valid"), 1, x)


def synth_depth(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Disparity (1/m) [S, S, 1] float32 of the digit as a relief on a tilted plane."""
    s = image.shape[0]
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1) - 0.5
    plane = rng.uniform(0.8, 1.6) + rng.uniform(-0.03, 0.03) * xx + rng.uniform(-0.03, 0.03) * yy
    relief = 0.04 * _blur(_ink(image), 0.7)
    depth = plane - relief + rng.normal(0, 0.002, (s, s))
    return (1.0 / depth)[..., None].astype(np.float32)


def synth_thermal(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [S, S, 1] heat image: warm blurred ink, gain/offset, column fixed-pattern and sensor noise."""
    s = image.shape[0]
    heat = _blur(_ink(image), rng.uniform(0.8, 1.6))
    heat = heat / max(heat.max(), 1e-6)
    base = rng.uniform(40, 90)
    img = base + rng.uniform(90, 150) * heat
    img += rng.normal(0, 3.0, (1, s))  # column fixed-pattern noise (microbolometer)
    img += rng.normal(0, 4.0, (s, s))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)[..., None]


def synth_imu(label: int, rng: np.random.Generator) -> np.ndarray:
    """float16 [6, 2000]: accelerometer (m/s^2) and gyroscope (rad/s) of a pen writing the digit."""
    pts = _template(label) + rng.normal(0, 0.03, (len(_template(label)), 2))
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    arc = np.concatenate([[0], np.cumsum(seg)]) / max(seg.sum(), 1e-6)
    tempo = rng.uniform(0.8, 1.25)
    write = int(min(IMU_LENGTH - 100, 1200 / tempo))  # samples spent writing
    onset = int(rng.integers(20, IMU_LENGTH - write - 20))
    u = np.linspace(0, 1, write)
    u = u + 0.03 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * u) * u * (1 - u)  # uneven speed
    size = rng.uniform(0.03, 0.06)  # metres
    xy = np.stack([np.interp(u, arc, pts[:, 0]), np.interp(u, arc, pts[:, 1])], 1) * size
    pos = np.concatenate([np.repeat(xy[:1], onset, 0), xy, np.repeat(xy[-1:], IMU_LENGTH - onset - write, 0)])
    dt = 1.0 / IMU_RATE
    vel = np.gradient(pos, dt, axis=0)
    acc = np.gradient(vel, dt, axis=0)
    acc = np.stack([_smooth(acc[:, 0]), _smooth(acc[:, 1])], 1)
    heading = np.unwrap(np.arctan2(_smooth(vel[:, 1]), _smooth(vel[:, 0]) + 1e-9))
    tilt = 0.3 * np.tanh(np.linalg.norm(vel, axis=1) / 0.02)
    roll, pitch = tilt * np.cos(heading), tilt * np.sin(heading)
    g = 9.81
    accel = np.stack([acc[:, 0] + g * np.sin(pitch), acc[:, 1] - g * np.sin(roll),
                      g * np.cos(roll) * np.cos(pitch) + 0.0 * acc[:, 0]], 0)
    gyro = np.stack([np.gradient(roll, dt), np.gradient(pitch, dt), np.gradient(heading, dt) * (tilt > 0.05)], 0)
    gyro = np.clip(gyro, -20, 20)
    out = np.concatenate([accel + rng.normal(0, 0.05, accel.shape), gyro + rng.normal(0, 0.02, gyro.shape)], 0)
    return out.astype(np.float16)


def _smooth(x: np.ndarray, width: int = 9) -> np.ndarray:
    k = np.hanning(width + 2)[1:-1]
    return np.convolve(np.pad(x, width // 2, mode="edge"), k / k.sum(), "valid")


def generate_example(image_8x8: np.ndarray, label: int, index: int) -> dict:
    """One example as stored (numpy arrays and a string); a pure function of its arguments."""
    rng = np.random.default_rng([SEED, index])
    image = _digits.upscale(image_8x8)
    caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(
        word=CLASS_NAMES[label], num=label)
    return {
        "image": image,
        "audio": synth_audio(label, rng),
        "depth": synth_depth(image, rng),
        "thermal": synth_thermal(image, rng),
        "imu": synth_imu(label, rng),
        "caption": caption,
        "label": int(label),
        "id": int(index),
    }


class DigitModalities(tfds.core.GeneratorBasedBuilder):
    """sklearn digits with audio, depth (disparity), thermal, IMU and captions (1497 train / 300 test)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)  # TFDS's default lookup needs importlib_resources.

    def _info(self) -> tfds.core.DatasetInfo:
        s = IMAGE_SIZE
        t = tfds.features.Tensor
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), dtype=np.uint8),
                "audio": t(shape=(AUDIO_SAMPLES,), dtype=np.int16),
                "depth": t(shape=(s, s, 1), dtype=np.float32),
                "thermal": tfds.features.Image(shape=(s, s, 1), dtype=np.uint8),
                "imu": t(shape=(IMU_CHANNELS, IMU_LENGTH), dtype=np.float16),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                "id": np.int64,
            }),
            supervised_keys=("image", "label"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Generated; the handwriting ships with scikit-learn.
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

        source = load_digits()
        labels = source.target.astype(int)
        train, test = _digits.split_indices(labels)
        return {"train": self._generate_examples(source.images, labels, train),
                "test": self._generate_examples(source.images, labels, test)}

    def _generate_examples(self, images, labels, indices):
        import io  # pylint: disable=import-outside-toplevel

        from PIL import Image  # pylint: disable=import-outside-toplevel

        for i in indices:
            ex = generate_example(images[i], int(labels[i]), int(i))
            for key in ("image", "thermal"):  # PIL's PNG encoder (TFDS's own would need TensorFlow)
                png = io.BytesIO()
                Image.fromarray(ex[key] if key == "image" else ex[key][..., 0]).save(png, format="PNG", compress_level=1)
                ex[key] = png.getvalue()
            yield int(i), ex


def ensure_built(data_dir: str | None = None) -> str:
    """Builds `digit_modalities` (array_record) under `data_dir` if needed; returns data_dir."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir or _digits.default_data_dir()))
    with build_lock.exclusive(data_dir, NAME):
        if not os.path.exists(os.path.join(data_dir, NAME, str(DigitModalities.VERSION), "dataset_info.json")):
            builder = DigitModalities(data_dir=data_dir, file_format="array_record")
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


def data_source(split: str, data_dir: str | None = None):
    """Random-access source of one split (built first if needed)."""
    data_dir = ensure_built(data_dir)
    return DigitModalities(data_dir=data_dir).as_data_source(split=split)
