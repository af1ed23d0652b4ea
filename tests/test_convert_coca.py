"""open_clip CoCa -> colearn_jax parity: a randomly initialised open_clip CoCa at small, non-default
sizes (tests/coca_reference.py) is converted through `python -m colearn_jax.convert --source=open_clip`
and loaded back; image and text embeddings and the teacher-forced caption logits agree within 1e-4,
and greedy and beam-search captions (colearn_jax.decoding with the KV cache) equal open_clip's
`generate` token for token.

open_clip 3.3's `generate` needs transformers < 5 (`BeamSearchScorer`): the reference runs in a
subprocess with such a transformers first on its path (`colearn_jax.open_clip_env`: the environment's
own if it is < 5, else `$COLEARN_TRANSFORMERS4_PATH`, else ~/.cache/colearn_jax/transformers4, filled
once with `pip install --target DIR transformers==4.55.4 tokenizers==0.21.4 huggingface-hub==0.36.0`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

from colearn_jax import decoding, open_clip_env  # noqa: E402
from colearn_jax.models.coca import decode_fns  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOT, EOS, PAD = 62, 63, 0
SPEC = {
    "model": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16,
                       "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 6,
                       "output_tokens": True},
        "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 24, "heads": 3, "layers": 2,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 12, "vocab_size": 64, "width": 24, "heads": 2, "layers": 2},
    },
    "generate": {"sot_id": SOT, "eos_id": EOS, "pad_id": PAD, "seq_len": 11, "min_seq_len": 3,
                 "repetition_penalty": 1.2, "num_beams": 3},
    "batch": 4,
}


def _reference_env() -> dict:
    try:
        return open_clip_env.subprocess_env()
    except RuntimeError as e:  # pip could not install transformers 4.x
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("coca_reference")
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    env = _reference_env()
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "coca_reference.py"), str(spec_path), str(out)],
                   check=True, env=env, cwd=str(out), timeout=600)
    with open(out / "model_config.json", "w") as f:
        json.dump(SPEC["model"], f)
    return out


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    from colearn_jax import load
    from colearn_jax.convert.__main__ import main

    workdir = tmp_path_factory.mktemp("coca_converted")
    rc = main(["--source=open_clip", f"--input={reference / 'model.safetensors'}",
               f"--model_config={reference / 'model_config.json'}", f"--output={workdir}"])
    assert rc == 0
    model, variables, config = load(str(workdir))
    return model, variables, config


def test_converted_config(converted):
    _, _, config = converted
    m = config.model
    assert m.name == "coca" and m.pooler == "open_clip" and m.legacy_cls_mask
    assert (m.num_queries, m.pooler_heads, m.embed_dim) == (6, 2, 24)
    assert (m.vision.width, m.vision.layers, m.vision.heads, m.vision.patch_size) == (32, 2, 2, 8)
    assert (m.text.context_length, m.text.heads, m.decoder.heads, m.decoder.layers) == (12, 3, 2, 2)


def test_embeddings_and_logits_match_open_clip(converted, reference):
    model, variables, _ = converted
    inputs, ref = np.load(reference / "inputs.npz"), np.load(reference / "outputs.npz")
    batch = {"image": inputs["images"].transpose(0, 2, 3, 1), "text": inputs["text"].astype(np.int32)}
    out = jax.jit(model.apply)(variables, batch)
    diffs = {k: float(np.abs(np.asarray(out[a]) - ref[k]).max())
             for a, k in (("image_embeds", "image_features"), ("text_embeds", "text_features"), ("logits", "logits"))}
    print("max abs diff vs open_clip:", diffs)
    assert all(d < 1e-4 for d in diffs.values()), diffs
    assert np.abs(ref["logits"]).max() > 1.0  # a non-trivial comparison


def _pad_to(x, n):
    return np.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=PAD)


def test_greedy_and_beam_captions_match_open_clip(converted, reference):
    model, variables, _ = converted
    inputs, ref = np.load(reference / "inputs.npz"), np.load(reference / "outputs.npz")
    g = SPEC["generate"]
    images = jnp.asarray(inputs["images"].transpose(0, 2, 3, 1))
    prompt = jnp.full((images.shape[0], 1), SOT, jnp.int32)
    new = g["seq_len"] - 1
    common = dict(max_new_tokens=new, eos_id=EOS, pad_id=PAD, min_new_tokens=g["min_seq_len"] - 1,
                  repetition_penalty=g["repetition_penalty"])
    fns = decode_fns(model, 1 + new)
    greedy = decoding.generate(*fns, variables, images, prompt,
                               decoding.DecodeConfig(eos_at_max_length=True, **common))
    expected = _pad_to(ref["greedy"][:, 1:], new)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), expected)
    beam = decoding.generate(*fns, variables, images, prompt, decoding.DecodeConfig(
        method="beam", num_beams=g["num_beams"], beam_scores="logits", length_penalty=1.0, early_stopping=False,
        **common))
    expected = _pad_to(ref["beam"][:, 1:], new)
    np.testing.assert_array_equal(np.asarray(beam.tokens), expected)
    assert (expected == EOS).any(axis=1).all()  # captions that end, so EOS handling is compared too
    assert not np.array_equal(np.asarray(beam.tokens), np.asarray(greedy.tokens))
