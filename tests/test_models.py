"""CLIP model and system: initial scale, clamp, weight-decay mask, QuickGELU and bf16 switches,
SigLIP variant, and the paper-size presets lowering on the 8-device mesh under FSDP."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colearn_jax.models import get_system
from colearn_jax.models.clip import MAX_LOGIT_SCALE, clamp_logit_scale
from colearn_jax.train.optimizer import weight_decay_mask
from colearn_jax.train.program import TrainProgram
from tests.helpers import load_config, synthetic_clip_batch


def _init(config, batch=None):
    system = get_system("clip")
    model = system.build_model(config)
    batch = batch or synthetic_clip_batch(config, 4)
    return model, nn.unbox(model.init(jax.random.PRNGKey(0), batch)), batch


def test_logit_scale_init_and_clamp():
    config = load_config("clip.py:tiny")
    _, variables, _ = _init(config)
    np.testing.assert_allclose(variables["params"]["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
    clamped = clamp_logit_scale({"logit_scale": jnp.float32(9.0), "w": jnp.ones(2)})
    assert float(clamped["logit_scale"]) == pytest.approx(MAX_LOGIT_SCALE)
    assert float(clamp_logit_scale({"logit_scale": jnp.float32(-1.0)})["logit_scale"]) == 0.0


def test_weight_decay_mask_exempts_biases_norms_positions_and_scale():
    config = load_config("clip.py:tiny")
    _, variables, _ = _init(config)
    flat = {"/".join(str(k.key) for k in path): v for path, v in
            jax.tree_util.tree_leaves_with_path(weight_decay_mask(variables["params"]))}
    assert not flat["logit_scale"]
    assert not flat["vision/positional_embedding"] and not flat["text/positional_embedding"]
    assert not flat["vision/class_embedding"]
    assert not any(v for k, v in flat.items() if k.endswith("bias") or "/ln" in k)
    assert flat["text/token_embedding/embedding"] and flat["vision/proj"] and flat["text/text_projection"]
    assert flat["vision/transformer/layer_0/block/mlp/fc/kernel"]


def test_quick_gelu_switch_changes_the_function():
    config = load_config("clip.py:tiny")
    model, variables, batch = _init(config)
    config.unlock()
    config.model.activation = "quick_gelu"
    quick = get_system("clip").build_model(config)
    a = model.apply(variables, batch)["image_embeds"]
    b = quick.apply(variables, batch)["image_embeds"]
    assert not np.allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, b, atol=0.1)  # a close approximation of GELU


def _step(config, seed=0, steps=1):
    program = TrainProgram.build(config)
    state = program.init_state(seed)
    for _ in range(steps):
        state, metrics = program.step(state, program.place_batch(synthetic_clip_batch(config)))
    return state, metrics


def test_bf16_compute_keeps_fp32_params_and_matches_fp32_loss():
    config = load_config("clip.py:tiny")
    config.unlock()
    _, fp32_metrics = _step(config)
    config.model.dtype = "bfloat16"
    state, metrics = _step(config)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)
    np.testing.assert_allclose(metrics["loss"], fp32_metrics["loss"], rtol=2e-2)


def test_siglip_variant_initialises_scale_and_bias_and_trains():
    config = load_config("clip.py:tiny,siglip")
    state, metrics = _step(config, steps=2)  # step 0 has learning rate 0 (warm-up)
    assert float(state.params["logit_bias"]) != -10.0  # it received a gradient
    np.testing.assert_allclose(metrics["logit_scale"], 10.0, rtol=1e-2)
    assert np.isfinite(metrics["loss"])


# Parameter counts of the reference models (OpenAI CLIP / open_clip).
PAPER_PARAMS = {"vit_b32": 151_277_313, "vit_b16": 149_620_737, "vit_l14": 427_616_513, "rn50": 102_007_137}


@pytest.mark.parametrize("preset", list(PAPER_PARAMS))
def test_paper_presets_build_and_lower_under_fsdp(preset):
    config = load_config(f"clip.py:{preset}")
    config.unlock()
    config.sharding = "fsdp"
    program = TrainProgram.build(config)
    abstract = program.abstract_state
    assert sum(x.size for x in jax.tree.leaves(abstract.params)) == PAPER_PARAMS[preset]
    lowered = program.lower()
    assert "mhlo.num_partitions = 8" in lowered.as_text()  # partitioned over the whole mesh
    largest = max(zip(jax.tree.leaves(abstract.params), jax.tree.leaves(program.state_shardings.params)),
                  key=lambda t: t[0].size)
    assert ("data", "fsdp") in tuple(largest[1].spec)
