"""Dataset mixtures: weights give the proportions, the stream is deterministic under the seed, and
its iterator resumes exactly from a saved state."""
import grain
import ml_collections
import numpy as np
import pytest

from colearn_jax.data import mixture


def _stream(seed=0, reshuffle=True):
    a = grain.MapDataset.range(0, 50)
    b = grain.MapDataset.range(1000, 1020)
    return mixture.mix([a, b], [3, 1], seed=seed, reshuffle=reshuffle)


def test_weights_set_the_proportions():
    exact = [_stream(reshuffle=False)[i] for i in range(400)]
    assert sum(x >= 1000 for x in exact) == 100  # exactly 1 in 4
    shuffled = [_stream()[i] for i in range(4000)]
    assert abs(np.mean([x >= 1000 for x in shuffled]) - 0.25) < 0.03
    assert set(x for x in shuffled if x < 1000) == set(range(50))  # every example of each dataset appears


def test_deterministic_and_resumable():
    first = [_stream(seed=1)[i] for i in range(64)]
    assert first == [_stream(seed=1)[i] for i in range(64)]
    assert first != [_stream(seed=2)[i] for i in range(64)]
    it = iter(_stream(seed=1).batch(8).to_iter_dataset())
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = iter(_stream(seed=1).batch(8).to_iter_dataset())
    fresh.set_state(state)
    np.testing.assert_array_equal(np.stack([next(fresh) for _ in range(2)]), np.stack(expected))


def test_mixture_config_errors_name_the_entry():
    cfg = ml_collections.ConfigDict(dict(name="digits_captions", text_key="captions", mixture=[]))
    assert mixture.component_configs(cfg) == [({}, 1.0)]
    cfg.mixture = [{"name": "a", "weight": 2}, {"name": "b", "text_key": "t", "weight": 1}]
    assert mixture.component_configs(cfg) == [({"name": "a"}, 2), ({"name": "b", "text_key": "t"}, 1)]
    cfg.mixture = [{"name": "a"}]
    with pytest.raises(ValueError, match=r"config.data.mixture\[0\].*needs a 'weight'"):
        mixture.component_configs(cfg)
    cfg.mixture = [{"name": "a", "weight": 1, "captions_key": "x"}]
    with pytest.raises(ValueError, match=r"mixture\[0\] has keys \['captions_key'\]"):
        mixture.component_configs(cfg)
    cfg.mixture = [{"name": "a", "weight": 0}]
    with pytest.raises(ValueError, match=r"mixture\[0\].weight=0.0 must be > 0"):
        mixture.component_configs(cfg)


def test_clip_pipeline_mixes_datasets_by_config_and_resumes():
    """config.data.mixture through the real TFDS + grain pipeline: batches have the usual features, the
    iterator state restores exactly, and a bad entry is named."""
    from colearn_jax.configs.clip import get_config
    from colearn_jax.data import pipeline, tokenizers

    c = get_config("tiny")
    c.unlock()
    c.data.mixture = [{"name": "digits_captions", "weight": 3}, {"name": "digits_captions", "weight": 1,
                                                               "text_key": "caption"}]
    tok = tokenizers.get_tokenizer("byte")
    it = pipeline.make_train_iterator(c.data, tok, seed=0)
    first = next(it)
    assert first["image"].shape == (32, 16, 16, 3) and first["text"].shape == (32, 24)
    state = it.get_state()
    expected = next(it)
    fresh = pipeline.make_train_iterator(c.data, tok, seed=0)
    fresh.set_state(state)
    again = next(fresh)
    for k in expected:
        np.testing.assert_array_equal(again[k], expected[k])
    c.data.mixture = [{"name": "digits_captions", "weight": 1, "label_key": None}, {"name": "digits_captions",
                                                                                    "weight": 1}]
    with pytest.raises(ValueError, match=r"config.data.mixture\[1\] \(digits_captions\) has labels"):
        pipeline.make_train_iterator(c.data, tok, seed=0)
