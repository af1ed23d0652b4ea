"""digit_modalities (colearn_jax/data/digit_modalities.py) and the real-format readers (modality_io.py):
determinism, shapes/dtypes, each raw modality tells the class (nearest-centroid beats chance by far on
held-out examples), and WAV / depth PNG / IMU CSV round trips."""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from colearn_jax.data import audio, digit_modalities as dm, modality_io


@pytest.fixture(scope="module")
def generated():
    """~400 examples generated directly (the builder's own per-example function)."""
    src = load_digits()
    idx = np.arange(0, 1797, 4)
    return [dm.generate_example(src.images[i], int(src.target[i]), int(i)) for i in idx]


def test_examples_are_deterministic_and_typed(generated):
    src = load_digits()
    again = dm.generate_example(src.images[0], int(src.target[0]), 0)
    for k, v in generated[0].items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(again[k]))
    other = dm.generate_example(src.images[4], int(src.target[4]), 4)
    assert not np.array_equal(other["audio"], again["audio"])
    ex = generated[0]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert ex["audio"].shape == (32000,) and ex["audio"].dtype == np.int16
    assert ex["depth"].shape == (32, 32, 1) and ex["depth"].dtype == np.float32
    assert 0.5 < ex["depth"].min() and ex["depth"].max() < 1.5  # disparity of 0.8-1.6 m
    assert ex["thermal"].shape == (32, 32, 1) and ex["thermal"].dtype == np.uint8
    assert ex["imu"].shape == (6, 2000) and ex["imu"].dtype == np.float16 and np.all(np.isfinite(ex["imu"]))
    assert dm.CLASS_NAMES[ex["label"]] in ex["caption"] or str(ex["label"]) in ex["caption"]


def _features(ex, modality):
    if modality == "audio":  # log-mel averaged over time: the raw spectrum, no learning
        mel = np.asarray(audio.waveform_to_melspec(audio.int16_to_float(ex["audio"])[None]))[0]
        return np.concatenate([mel.mean(-1), mel.std(-1)])
    if modality == "imu":  # per-channel magnitude spectrum (shift-invariant)
        return np.log1p(np.abs(np.fft.rfft(ex["imu"].astype(np.float32), axis=-1))[:, 1:80]).ravel()
    x = ex[modality].astype(np.float32)
    return ((x - x.mean()) / (x.std() + 1e-6)).ravel()


@pytest.mark.parametrize("modality", ["audio", "depth", "thermal", "imu"])
def test_each_modality_tells_the_class(generated, modality):
    x = np.stack([_features(e, modality) for e in generated])
    y = np.array([e["label"] for e in generated])
    train, test = np.arange(len(y)) % 3 != 0, np.arange(len(y)) % 3 == 0
    centroids = np.stack([x[train & (y == c)].mean(0) for c in range(10)])
    pred = np.argmin(((x[test][:, None] - centroids[None]) ** 2).sum(-1), 1)
    acc = np.mean(pred == y[test])
    print(modality, "nearest-centroid accuracy", acc)
    assert acc > 0.3  # chance is 0.1


def test_builder_splits(tmp_path_factory):
    """The TFDS builder (built once, < 1 min): split sizes, held-out handwriting, stored values."""
    import os

    data_dir = os.environ["TFDS_DATA_DIR"]
    train, test = dm.data_source("train", data_dir), dm.data_source("test", data_dir)
    assert (len(train), len(test)) == (1497, 300)
    ex = test[0]
    ref = dm.generate_example(load_digits().images[ex["id"]], int(ex["label"]), int(ex["id"]))
    np.testing.assert_array_equal(ex["audio"], ref["audio"])
    np.testing.assert_array_equal(ex["thermal"], ref["thermal"])
    np.testing.assert_array_equal(ex["imu"], ref["imu"])
    assert {train[i]["id"] for i in range(0, 1497, 50)}.isdisjoint({test[i]["id"] for i in range(300)})


def test_wav_round_trip_and_resampling(tmp_path):
    pcm = dm.synth_audio(3, np.random.default_rng(0))
    modality_io.write_wav(tmp_path / "a.wav", pcm)
    x, rate = modality_io.read_wav(tmp_path / "a.wav")
    assert rate == 16000 and x.dtype == np.float32
    np.testing.assert_array_equal(x, pcm.astype(np.float32) / 32768)
    stereo = np.stack([pcm, pcm], 1)
    modality_io.write_wav(tmp_path / "s.wav", stereo[::2], sample_rate=8000)
    y, rate = modality_io.read_wav(tmp_path / "s.wav")
    assert rate == 16000 and abs(len(y) - 32000) <= 1
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000) * 32767).astype(np.int16)
    modality_io.write_wav(tmp_path / "t.wav", tone, sample_rate=8000)
    z, _ = modality_io.read_wav(tmp_path / "t.wav")
    assert np.argmax(np.abs(np.fft.rfft(z))) == 440  # 1 s at 16 kHz: bin = Hz


def test_depth_png_and_imu_csv_round_trip(tmp_path):
    disp = dm.synth_depth(dm._digits.upscale(load_digits().images[7]), np.random.default_rng(1))
    depth = 1.0 / disp[..., 0]
    depth[0, 0] = 0.0  # an invalid pixel
    modality_io.write_depth_png(tmp_path / "d.png", depth)
    back = modality_io.read_depth_png_as_disparity(tmp_path / "d.png")
    assert back.shape == (32, 32, 1) and back[0, 0, 0] == 0.0
    np.testing.assert_allclose(back[1:, 1:], disp[1:, 1:], rtol=1e-3)  # millimetre quantisation
    imu = dm.synth_imu(5, np.random.default_rng(2)).astype(np.float32)
    modality_io.write_imu_csv(tmp_path / "i.csv", imu[:, :1500])
    got = modality_io.read_imu_csv(tmp_path / "i.csv")
    assert got.shape == (6, 2000) and np.all(got[:, 1500:] == 0)
    np.testing.assert_allclose(got[:, :1500], imu[:, :1500], rtol=1e-5, atol=1e-5)
    (tmp_path / "bad.csv").write_text("t,acc_x\n0,1\n")
    with pytest.raises(ValueError, match="lacks columns"):
        modality_io.read_imu_csv(tmp_path / "bad.csv")
