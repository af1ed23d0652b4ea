"""experiments/coca_decoding.py (the CoCa decoding-speed benchmark) at `--size=tiny`: what it times is
the same decode both ways (cached tokens == uncached tokens, every row the full 30 tokens, the last
one EOS). No timings are asserted."""
import pytest

from tests.helpers import load_experiment


@pytest.fixture(scope="module")
def script():
    return load_experiment("coca_decoding")


@pytest.fixture(scope="module")
def built(script):
    return script.build_colearn("tiny", batch_size=2, new_tokens=30, seed=0)


def test_cached_and_uncached_decode_the_same_30_tokens(script, built):
    assert [d.name for d in built["decoders"]] == ["cached", "uncached", "cached_first_token",
                                                   "uncached_first_token"]
    checks = script.token_checks(built["warmup_outputs"], 30)
    assert checks["cached_equals_uncached"], checks
    assert checks["all_rows_full_length"], checks
    tokens = built["warmup_outputs"]["cached"].tokens
    assert tokens.shape == (2, 30)
    assert (tokens[:, :-1] != built["ids"]["eos"]).all() and (tokens[:, -1] == built["ids"]["eos"]).all()
    assert script.summarize([2.0, 1.0, 3.0], 8, 30)["tokens_per_s"] == 120.0  # 8 * 30 / median

