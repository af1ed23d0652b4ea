"""Performance tooling: peak table and MFU arithmetic, XLA FLOP accounting, the train-step benchmark,
the contrastive-loss memory table, and the scaling sweep's point enumeration. No timing thresholds."""
import math
import os

import jax
import jax.extend.core
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from colearn_jax import perf
from tests.helpers import ROOT, load_config
from tests.helpers import load_experiment as _load_experiment


@pytest.fixture(scope="module")
def bench():  # not `benchmark`: pytest-benchmark owns that fixture name
    return _load_experiment("benchmark")


@pytest.fixture(scope="module")
def scaling():
    return _load_experiment("scaling_study")


# ----------------------------------------------------------------------------- peak table, MFU
@pytest.mark.parametrize("kind,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", 494.5e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", 156e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
])
def test_peak_table(kind, dtype, expected):
    assert perf.peak_flops(kind, dtype) == expected
    assert perf.lookup_chip(kind) is not None


def test_peak_table_unknown_and_bad_dtype():
    assert perf.peak_flops("cpu", "float32") is None
    assert perf.lookup_chip("cpu") is None
    assert perf.lookup_chip("NVIDIA H100 PCIe") == "H100 PCIe"  # not the SXM entry
    assert perf.lookup_chip("TPU v5 lite") == "TPU v5e"  # not v5p
    with pytest.raises(ValueError, match="int8"):
        perf.peak_flops("TPU v4", "int8")


def test_mfu_arithmetic():
    # 8 H100s, 3.96e15 FLOPs per step in 1 s: 3.96e15 / (8 * 989e12) = 50%.
    assert perf.mfu(3.956e15, 1.0, 8, 989e12) == pytest.approx(0.5)
    assert perf.mfu(1e12, 0.5, 1, 4e12) == pytest.approx(0.5)
    assert perf.mfu(1e12, 1.0, 4, None) is None  # CPU: no peak
    assert perf.mfu(None, 1.0, 4, 1e12) is None
    assert perf.tflops_per_s(2e12, 0.5) == pytest.approx(4.0)
    assert perf.fmt_pct(None) == "n/a" and perf.fmt_pct(0.4) == "40.0%"
    with pytest.raises(ValueError):
        perf.mfu(1e12, 1.0, 0, 1e12)


def test_analytic_flops_match_open_clip_profile():
    # open_clip's model profile: ViT-B/16 41.09 GFLOPs, ViT-B/32 14.78, ViT-L/14 175.3 (forward, per pair).
    for preset, ref in (("vit_b16", 41.09e9), ("vit_b32", 14.78e9), ("vit_l14", 175.3e9)):
        assert perf.clip_forward_flops(load_config(f"clip.py:{preset}")) == pytest.approx(ref, rel=0.01)
    assert perf.clip_forward_flops(load_config("clip.py:rn50")) is None


def _matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general and convolution in a jaxpr (sub-jaxprs included)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), (lb, _) = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # HWIO in flax's convolutions
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[:-1])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _matmul_flops(sub)
    return total


@pytest.mark.parametrize("stem", ["conv", "patch"])
def test_vit_analytic_flops_equal_the_models_matmuls(stem):
    """`perf.vit_forward_flops` (SimCLR's ViT encoder, CLIP's towers) counts exactly the dot and convolution
    FLOPs of `nn.vit.VisionTransformer`'s forward (one image; the attention kernel's two matmuls included)."""
    import flax.linen as nn  # noqa: PLC0415

    from colearn_jax.nn.vit import VisionTransformer  # noqa: PLC0415

    model = VisionTransformer(image_size=32, patch_size=8, width=48, num_layers=2, num_heads=4, mlp_ratio=4.0,
                              pool="gap", stem=stem, attention_impl="xla")
    images = jnp.zeros((1, 32, 32, 3))
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), images))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images))(variables)
    expected = perf.vit_forward_flops(32, 8, 48, 2, 4.0, stem)
    assert _matmul_flops(jaxpr.jaxpr) == pytest.approx(expected, rel=1e-9)
    simclr = load_config("simclr.py:digit_scenes")
    assert perf.simclr_train_flops(simclr, 8) > 3 * 16 * perf.vit_forward_flops(32, 8, 96, 4, 4.0, "conv")


@pytest.mark.parametrize("preset,pooler", [("tiny", "open_clip"), ("tiny", "paper"), ("scenes", "open_clip")])
def test_coca_analytic_flops_equal_the_models_matmuls(preset, pooler):
    """`perf.coca_forward_flops` counts exactly the dot and convolution FLOPs of CoCa's teacher-forced forward
    (one image-caption pair; both pooler layouts; the conv stem of `scenes`)."""
    import flax.linen as nn  # noqa: PLC0415

    from colearn_jax.models import get_system  # noqa: PLC0415

    config = load_config(f"coca.py:{preset}")
    config.unlock()
    config.model.update(scan=False, pooler=pooler)
    model = get_system("coca").build_model(config)
    v, t = config.model.vision, config.model.text
    batch = {"image": jnp.zeros((1, v.image_size, v.image_size, 3)), "text": jnp.ones((1, t.context_length), jnp.int32)}
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), batch))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, batch))(variables)
    assert _matmul_flops(jaxpr.jaxpr) == pytest.approx(perf.coca_forward_flops(config), rel=1e-9)
    assert perf.analytic_train_flops(config, 4) == perf.coca_train_flops(config, 4) > 3 * 4 * _matmul_flops(jaxpr.jaxpr)


def test_cost_analysis_compiled_is_per_device_lowered_is_global():
    mesh = jax.make_mesh((8,), ("data",))
    x = jax.ShapeDtypeStruct((1024, 64), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P()))
    lowered = jax.jit(lambda x, w: x @ w).lower(x, w)
    total = 2 * 1024 * 64 * 32
    assert perf.cost_flops(lowered) == pytest.approx(total)
    assert perf.cost_flops(lowered.compile()) == pytest.approx(total / 8)
    mem = perf.memory_analysis(lowered.compile())
    assert mem["argument_bytes"] == (1024 // 8) * 64 * 4 + 64 * 32 * 4  # per device
    assert mem["peak_estimate_bytes"] >= mem["argument_bytes"]


def test_flops_twin_unrolls_scan_and_uses_xla_attention():
    plain = load_config("clip.py:tiny")
    assert perf.flops_twin_config(plain) is None  # unrolled, XLA attention: counted as it is
    b16 = load_config("clip.py:vit_b16")
    b16.unlock()
    b16.model.attention_impl = "cudnn"
    twin = perf.flops_twin_config(b16)
    assert twin.model.scan is False and twin.model.attention_impl is None
    assert b16.model.scan is True and b16.model.attention_impl == "cudnn"  # the original is untouched
    assert twin.model.vision.to_dict() == b16.model.vision.to_dict() and twin.data.batch_size == b16.data.batch_size


def test_step_flops_counts_the_twin_when_scanned():
    class Stage:  # stands in for a Lowered / Compiled stage
        def __init__(self, flops):
            self.flops = flops

        def cost_analysis(self):
            return None if self.flops is None else {"flops": self.flops}

    lowered_configs = []

    def lower(config):
        lowered_configs.append(config)
        return Stage(100.0)

    scanned = load_config("clip.py:tiny")
    scanned.unlock()
    scanned.model.scan = True
    r = perf.step_flops(scanned, Stage(40.0), Stage(5.0), lower=lower)
    assert (r["flops_per_step"], r["flops_per_step_xla_raw"], r["flops_per_step_per_device_xla"]) == (100.0, 40.0, 5.0)
    assert [c.model.scan for c in lowered_configs] == [False]
    assert r["flops_per_step_analytic"] == perf.clip_train_flops(scanned, scanned.data.batch_size)
    assert perf.step_flops(scanned, Stage(40.0), lower=None)["flops_per_step"] == 40.0  # twin skipped
    r = perf.step_flops(scanned, Stage(None), lower=lower)  # a backend without cost analysis (the GPU's)
    assert r["flops_per_step"] is None and len(lowered_configs) == 1  # no twin lowered for nothing


def test_time_steps_counts_only_steady_state():
    calls = []

    def step(carry, batch):
        calls.append(batch)
        return carry + 1, jnp.zeros(())

    carry, times = perf.time_steps(step, jnp.zeros(()), [1, 2], warmup=2, steps=3)
    assert int(carry) == 5 and len(times) == 3 and calls == [1, 2, 1, 2, 1]
    assert perf.summarize_times(times)["n"] == 3


# ----------------------------------------------------------------------------- train-step benchmark
def test_benchmark_train_step_tiny_on_8_devices(bench):
    config = load_config("clip.py:tiny")
    r = bench.benchmark_train_step(config, steps=2, warmup=1)
    assert r["devices"] == 8 and r["global_batch"] == config.data.batch_size
    for key in ("compile_s", "lower_s", "step_time_s", "examples_per_s", "examples_per_s_per_device",
                "flops_per_step", "flops_per_step_per_device_xla", "model_tflops_per_s"):
        assert r[key] > 0, key
    assert r["examples_per_s"] == pytest.approx(r["global_batch"] / r["step_time_s"])
    assert r["examples_per_s_per_device"] == pytest.approx(r["examples_per_s"] / 8)
    assert r["mfu"] is None and r["peak_tflops_per_device"] is None  # CPU has no peak
    assert r["memory"]["argument_bytes"] > 0 and r["memory"]["temp_bytes"] > 0
    # XLA's global count covers the analytic model FLOPs (plus optimizer, norms, softmax, loss).
    assert r["flops_per_step"] >= 0.9 * r["flops_per_step_analytic"]
    assert "step time" in bench.format_result(r) and "MFU" in bench.format_result(r)
    # With a peak given, MFU follows from the other numbers.
    peak = 1e12
    assert perf.mfu(r["flops_per_step"], r["step_time_s"], 8, peak) == pytest.approx(
        r["model_tflops_per_s"] * 1e12 / (8 * peak))


def test_synthetic_batch_token_ids_pool_at_eot(bench):
    config = load_config("clip.py:tiny")
    import numpy as np

    example = {"image": jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32),
               "text": jax.ShapeDtypeStruct((4, 24), jnp.int32)}
    b = bench.synthetic_batch(example, config, seed=1)
    vocab = config.model.text.vocab_size
    assert b["image"].shape == (4, 16, 16, 3) and b["text"].dtype == np.int32
    assert (b["text"].max(axis=1) == vocab - 1).all() and (b["text"] < vocab).all()


# ----------------------------------------------------------------------------- input pipeline benchmark
def test_benchmark_pipeline_tiny_with_device_normalisation(bench):
    config = load_config("clip.py:tiny")
    config.unlock()
    config.data.normalize_on_device = True  # the loop's step must normalise the uint8 batches itself
    r = bench.benchmark_pipeline(config, devices=jax.devices()[:1], steps=3, warmup=1, rounds=2, prefetch=1)
    assert r["config"]["global_batch"] == config.data.batch_size and r["config"]["devices"] == 1
    assert r["config"]["data"]["normalize_on_device"] is True and r["config"]["data"]["device_prefetch"] == 1
    for key in ("pipeline_host_examples_per_s", "pipeline_examples_per_s", "pipeline_host_cpu_ms_per_batch",
                "step_examples_per_s", "loop_examples_per_s"):
        assert r[key] > 0, key
    assert len(r["step_ms_rounds"]) == len(r["loop_ms_rounds"]) == 2
    assert r["loop_over_step"] == pytest.approx(r["loop_examples_per_s"] / r["step_examples_per_s"])
    table = bench.format_pipeline(r)
    assert "loop (prefetch 1)" in table and "loop / step alone" in table


# ----------------------------------------------------------------------------- loss memory
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_loss_memory_ring_below_auto(bench, loss):
    temp = {(g, b): bench.loss_memory(loss, g, b, dim=64)["temp_bytes"]
            for g in ("auto", "ring") for b in (256, 512)}
    for b in (256, 512):
        assert 0 < temp[("ring", b)] < temp[("auto", b)]
    assert temp[("auto", 512)] > temp[("auto", 256)]


def test_loss_memory_rejects_indivisible_batch(bench):
    with pytest.raises(ValueError, match="not divisible"):
        bench.loss_memory("clip", "auto", 100, dim=8)


# ----------------------------------------------------------------------------- scaling study
def _sweep():
    return _load_experiment("sweeps/clip_cpu").get_config()


def test_scaling_points_from_sweep(scaling):
    sweep = _sweep()
    points = scaling.enumerate_points(sweep, 8)
    n_model1 = sum(1 for m in sweep.meshes if m.get("model", 1) == 1)
    n_model2 = len(sweep.meshes) - n_model1
    assert len(points) == len(sweep.per_device_batch) * (2 * n_model1 + 4 * n_model2)  # tp only with model > 1
    for p in points:
        assert p["devices"] == math.prod(p["mesh"].values()) <= 8
        assert p["global_batch"] == p["per_device_batch"] * p["mesh"]["data"] * p["mesh"]["fsdp"]
        assert not ("tp" in p["sharding"] and p["mesh"]["model"] == 1)


def test_scaling_rejects_mesh_that_does_not_fit(scaling):
    sweep = _sweep()
    with pytest.raises(ValueError, match=r"sweep.meshes\[3\].*needs 8 devices but only 4 are available"):
        scaling.enumerate_points(sweep, 4)
    with pytest.raises(ValueError, match="unknown axes"):
        scaling.resolve_mesh({"data": 2, "pipeline": 2}, 8)
    with pytest.raises(ValueError, match="does not divide"):
        scaling.resolve_mesh({"data": -1, "model": 3}, 8)
    assert scaling.resolve_mesh({"data": -1, "model": 2}, 8) == {"data": 4, "fsdp": 1, "model": 2}
    with pytest.raises(ValueError, match="multi-host"):
        scaling.resolve_mesh({"data": 2}, 8, require_all=True)


def test_scaling_point_config_csv_and_plots(scaling, tmp_path):
    base = load_config("clip.py:tiny")
    point = dict(sharding="fsdp", mesh={"data": 2, "fsdp": 1, "model": 2}, devices=4, per_device_batch=4,
                 global_batch=8)
    c = scaling.point_config(base, {"model": {"dtype": "bfloat16"}}, point)
    assert (c.sharding, c.mesh.data, c.mesh.model, c.data.batch_size, c.model.dtype) == ("fsdp", 2, 2, 8, "bfloat16")
    rows = [dict(sharding="dp", mesh_data=d, mesh_fsdp=1, mesh_model=1, devices=d, per_device_batch=8,
                 global_batch=8 * d, peak_estimate_bytes=2**20 * (10 + d), examples_per_s=100.0 * d) for d in (1, 2, 4)]
    rows.append(dict(rows[0], sharding="fsdp", error="OOM"))
    scaling.write_csv(rows, str(tmp_path / "scaling.csv"))
    written = scaling.plot(rows, str(tmp_path), title="test")
    assert (tmp_path / "scaling.csv").read_text().count("\n") == len(rows) + 1
    assert sorted(os.path.basename(p) for p in written) == ["examples_per_s.png", "memory_per_device.png"]


# ----------------------------------------------------------------------------- open_clip comparison
@pytest.mark.parametrize("arch", ["tiny", "small", "vit_b32"])
def test_compare_open_clip_builds_the_same_architecture(arch):
    """The side-by-side benchmark's two models have identical parameter counts (open_clip's from
    its own factory with the same model config)."""
    open_clip = pytest.importorskip("open_clip")  # the `parity` extra; installed by the test command
    import numpy as np
    import torch

    compare = _load_experiment("compare_open_clip")
    a = compare.ARCHS[arch]
    config = compare.make_colearn_config(a, 2, 77, "float32")
    from colearn_jax.models import get_system

    system = get_system(config.model.name)
    model = system.build_model(config)
    example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), system.example_batch(config, 2))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))

    import json
    import tempfile

    cfg_dir = tempfile.mkdtemp()
    with open(os.path.join(cfg_dir, f"test-compare-{arch}.json"), "w") as f:
        json.dump(compare.open_clip_model_cfg(a, 77), f)
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    reference = open_clip.create_model(f"test-compare-{arch}", pretrained=None)
    assert ours == sum(p.numel() for p in reference.parameters())


def test_loss_memory_plot(bench, tmp_path):
    rows = [dict(loss=l, gather=g, global_batch=b, temp_bytes=b * (b if g != "ring" else 64))
            for l in ("clip", "siglip") for g in ("auto", "ring") for b in (1024, 8192)]
    path = bench.plot_loss_memory(rows, str(tmp_path / "loss_memory.png"))
    assert os.path.getsize(path) > 1000


def test_compile_only_analysis_and_remat_lowers_planned_memory(bench):
    """`--compile_only` analysis of a scanned stack: full remat cuts the per-device temp memory XLA plans
    and adds the recomputed forward to the FLOPs. (With scan=False, XLA:CPU's scheduler hoists the
    recomputation and the plan does not shrink; see experiments/RESULTS.md.)"""
    results = {}
    for policy in ("none", "full"):
        c = load_config("clip.py:tiny")
        c.unlock()
        c.model.update(scan=True, remat_policy=policy)
        c.model.vision.update(width=128, image_size=32)
        c.model.text.width = 128
        c.data.update(image_size=32, batch_size=128, eval_batch_size=128)
        results[policy] = bench.analyze_step(bench.lower_train_step(c), count_unscanned=False)
    none, full = results["none"], results["full"]
    assert full["memory"]["temp_bytes"] < 0.8 * none["memory"]["temp_bytes"]
    assert full["flops_per_step_xla_raw"] > none["flops_per_step_xla_raw"]
    table = bench.format_result(full)
    assert "temp" in table and "full" in table and "step time" not in table
