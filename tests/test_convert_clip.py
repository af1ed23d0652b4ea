"""CLIP checkpoint importers: float32 parity with Hugging Face CLIPModel, open_clip (ViT and
ModifiedResNet) and OpenAI-format state dicts, all with random non-trivial weights (no downloads);
scan layout, the CLI, and the errors for bad inputs."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import colearn_jax
from colearn_jax.convert import clip as cc
from colearn_jax.convert import torch_reader
from colearn_jax.convert.__main__ import main as cli_main
from colearn_jax.models.clip_system import build_model
from tests.torch_references import open_clip_model as _open_clip_model
from tests.torch_references import open_clip_reference as _open_clip_reference
from tests.torch_references import random_inputs as _inputs
from tests.torch_references import rerandomise as _rerandomise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
MAX_DIFFS = {}  # test id -> {quantity: max abs diff}, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for name, diffs in MAX_DIFFS.items():
        print(f"\n{name}: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))


def _ours(config, variables, images, ids):
    # jit: one compilation is much faster on CPU than dispatching (and compiling) op by op.
    out = jax.jit(build_model(config).apply)(variables, {"image": images, "text": ids.astype(np.int32)})
    img, txt = np.asarray(out["image_embeds"]), np.asarray(out["text_embeds"])
    logits = np.exp(float(out["logit_scale"])) * img @ txt.T
    if "logit_bias" in out:
        logits = logits + float(out["logit_bias"])
    return img, txt, logits


def _unit(x):
    x = x.detach().numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _compare(name, ours, ref):
    diffs = {k: float(np.max(np.abs(a - b))) for k, a, b in zip(("image", "text", "logits"), ours, ref)}
    MAX_DIFFS[name] = diffs
    for k, d in diffs.items():
        assert d <= TOL, f"{name}: {k} max abs diff {d:.3g} > {TOL}"
    return diffs


def _trees_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


# --------------------------------------------------------------------------------------------
# Hugging Face CLIPModel

HF_VARIANTS = {
    # gelu, HF's newer eos_token_id pooling (eos = vocab - 1 = the largest id, so argmax agrees)
    "gelu": dict(act="gelu", eos=999, length=20, eots=[3, 19, 11]),
    # OpenAI's quick_gelu, the legacy eos_token_id=2 (argmax pooling), texts shorter than the context
    "quick_gelu": dict(act="quick_gelu", eos=2, length=13, eots=[12, 5, 8]),
}


def _hf_model(act, eos, seed=0):
    from transformers import CLIPConfig, CLIPModel  # noqa: PLC0415

    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=20, hidden_act=act, eos_token_id=eos, bos_token_id=998, pad_token_id=0)
    vision = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                  image_size=40, patch_size=8, hidden_act=act)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    return _rerandomise(model, seed)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for i, (name, v) in enumerate(HF_VARIANTS.items()):
        model = _hf_model(v["act"], v["eos"], seed=i)
        path = str(tmp_path_factory.mktemp(f"hf_{name}"))
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def _hf_reference(model, images, ids):
    with torch.no_grad():
        o = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    return _unit(o.image_embeds), _unit(o.text_embeds), o.logits_per_image.numpy()


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_hf_parity(hf_dirs, variant):
    v = HF_VARIANTS[variant]
    model, path = hf_dirs[variant]
    config, variables = cc.convert("hf", path)
    m = config.model
    assert (m.activation, m.embed_dim, m.scan) == (v["act"], 24, False)
    assert dict(m.vision) == dict(type="vit", image_size=40, patch_size=8, width=48, layers=3, heads=4,
                                  mlp_ratio=4.0, pool="cls")
    assert dict(m.text) == dict(vocab_size=1000, context_length=20, width=32, layers=2, heads=2, mlp_ratio=2.5)
    images, ids = _inputs(3, 40, v["length"], 1000, v["eots"], seed=1)
    ours = _ours(config, variables, images, ids)
    _compare(f"hf[{variant}]", ours, _hf_reference(model, images, ids))

    if variant == "gelu":  # the scanned layout computes the same function
        config_s, variables_s = cc.convert("hf", path, scan=True)
        assert config_s.model.scan
        kernel = variables_s["params"]["vision"]["transformer"]["layers"]["block"]["attn"]["query"]["kernel"]
        assert kernel.shape == (3, 48, 4, 12)
        _trees_equal(cc.unstack_layers(variables_s["params"]["text"]["transformer"]),
                     variables["params"]["text"]["transformer"])
        scanned = _ours(config_s, variables_s, images, ids)
        for a, b in zip(scanned, ours):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_hf_unsupported_pooling_is_refused(tmp_path):
    model = _hf_model("gelu", eos=5)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(cc.ConversionError, match="eos_token_id=5"):
        cc.convert("hf", str(tmp_path))


# --------------------------------------------------------------------------------------------
# open_clip

OC_VIT = dict(embed_dim=24, quick_gelu=False,
              vision_cfg=dict(image_size=40, patch_size=8, width=48, layers=2, head_width=12, mlp_ratio=3.0),
              text_cfg=dict(context_length=16, vocab_size=500, width=32, heads=2, layers=2))
OC_RN = dict(embed_dim=24, quick_gelu=False, init_logit_bias=-4.0,
             vision_cfg=dict(image_size=64, layers=[1, 2, 1, 1], width=16, head_width=32),
             text_cfg=dict(context_length=16, vocab_size=500, width=32, heads=2, layers=2))


def test_open_clip_vit_parity_safetensors_and_pt(tmp_path):
    from safetensors.torch import save_file  # noqa: PLC0415

    model = _open_clip_model(OC_VIT, seed=3)
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps(OC_VIT))
    st_path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st_path))
    config, variables = cc.convert("open_clip", str(st_path), model_config=str(cfg_path))
    m = config.model
    assert m.activation == "gelu" and m.vision.heads == 4 and m.vision.mlp_ratio == 3.0 and m.text.heads == 2
    images, ids = _inputs(2, 40, 16, 500, [4, 15], seed=2)
    _compare("open_clip ViT (.safetensors)", _ours(config, variables, images, ids),
             _open_clip_reference(model, images, ids))

    # A training checkpoint as open_clip writes it ({"epoch", "state_dict"} with DDP's "module." prefix),
    # and the hub's open_clip_config.json layout ({"model_cfg": ...}): same variables.
    pt_path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, str(pt_path))
    hub_cfg = tmp_path / "open_clip_config.json"
    hub_cfg.write_text(json.dumps({"model_cfg": OC_VIT, "preprocess_cfg": {}}))
    config_pt, variables_pt = cc.convert("open_clip", str(pt_path), model_config=str(hub_cfg))
    assert config_pt.model.to_dict() == config.model.to_dict()
    _trees_equal(variables_pt, variables)

    # CustomTextCLIP (custom_text=True) keeps the same text tower under `text.`.
    from open_clip.model import convert_to_custom_text_state_dict  # noqa: PLC0415

    custom = convert_to_custom_text_state_dict(model.state_dict())
    assert "text.token_embedding.weight" in custom
    _, variables_custom = cc.convert_state_dict(custom, "open_clip", model_config={**OC_VIT, "custom_text": True})
    _trees_equal(variables_custom, variables)


def test_open_clip_modified_resnet_parity(tmp_path):
    model = _open_clip_model(OC_RN, seed=4)
    path = tmp_path / "rn.bin"
    torch.save(model.state_dict(), str(path))
    config, variables = cc.convert("open_clip", str(path), model_config=OC_RN)
    v = config.model.vision
    assert (v.type, v.image_size, list(v.layers), v.width, v.heads) == ("resnet", 64, [1, 2, 1, 1], 16, 16)
    assert config.model.init_logit_bias is not None and config.loss.name == "siglip"
    assert set(variables) == {"params", "batch_stats"}
    images, ids = _inputs(2, 64, 16, 500, [15, 6], seed=3)
    _compare("open_clip ModifiedResNet (.bin, logit_bias)", _ours(config, variables, images, ids),
             _open_clip_reference(model, images, ids))

    # OpenAI-style shape inference finds the same ResNet; heads (not in any shape) given explicitly.
    config_oa, variables_oa = cc.convert("openai", str(path), vision_heads=16, text_heads=2)
    assert config_oa.model.vision.to_dict() == v.to_dict() and config_oa.model.activation == "quick_gelu"
    _trees_equal(variables_oa, variables)


def test_open_clip_unsupported_and_mismatched_configs(tmp_path):
    model = _open_clip_model(OC_VIT, seed=3)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), str(path))
    bad = json.loads(json.dumps(OC_VIT))
    bad["vision_cfg"]["width"] = 64
    with pytest.raises(cc.ConversionError, match="vision_cfg.width=64"):
        cc.convert("open_clip", str(path), model_config=bad)
    bad = json.loads(json.dumps(OC_VIT))
    bad["text_cfg"]["ls_init_value"] = 1e-5
    with pytest.raises(cc.ConversionError, match="ls_init_value"):
        cc.convert("open_clip", str(path), model_config=bad)
    sd = {k: v for k, v in model.state_dict().items()}
    sd["visual.extra.weight"] = torch.zeros(3)
    with pytest.raises(cc.ConversionError, match="visual.extra.weight"):
        cc.convert_state_dict(sd, "open_clip", model_config=OC_VIT)


# --------------------------------------------------------------------------------------------
# OpenAI format: no config, the architecture comes from the shapes (heads = width / 64)

OPENAI_LIKE = dict(embed_dim=32, quick_gelu=True,
                   vision_cfg=dict(image_size=24, patch_size=8, width=128, layers=2, head_width=64, mlp_ratio=2.0),
                   text_cfg=dict(context_length=12, vocab_size=300, width=128, heads=2, layers=1, mlp_ratio=2.0))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_openai_format_shape_inference_parity(tmp_path):
    model = _open_clip_model(OPENAI_LIKE, seed=5)
    path = tmp_path / "openai_like.pt"
    torch.save(model.state_dict(), str(path))
    config, variables = cc.convert("openai", str(path))
    m = config.model
    assert m.activation == "quick_gelu" and m.embed_dim == 32
    assert dict(m.vision) == dict(type="vit", image_size=24, patch_size=8, width=128, layers=2, heads=2,
                                  mlp_ratio=2.0, pool="cls")
    assert dict(m.text) == dict(vocab_size=300, context_length=12, width=128, layers=1, heads=2, mlp_ratio=2.0)
    images, ids = _inputs(3, 24, 12, 300, [11, 2, 7], seed=4)
    _compare("openai format (shape inference)", _ours(config, variables, images, ids),
             _open_clip_reference(model, images, ids))

    # OpenAI's released files are TorchScript archives: same weights through torch.jit.load.
    jit_path = tmp_path / "openai_like_jit.pt"
    torch.jit.script(model).save(str(jit_path))
    assert torch_reader.is_torchscript_archive(str(jit_path))
    config_jit, variables_jit = cc.convert("openai", str(jit_path))
    assert config_jit.model.to_dict() == m.to_dict()
    _trees_equal(variables_jit, variables)


# --------------------------------------------------------------------------------------------
# CLI, checkpoint round trip, errors


def test_cli_writes_a_loadable_checkpoint(hf_dirs, tmp_path):
    model, path = hf_dirs["gelu"]
    out = tmp_path / "converted"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "colearn_jax.convert", "--source=hf", f"--input={path}", f"--output={out}", "--scan"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scan=True" in proc.stdout
    loaded_model, variables, config = colearn_jax.load(str(out))
    assert config.model.scan and config.model.vision.width == 48
    images, ids = _inputs(2, 40, 20, 1000, [19, 9], seed=5)
    out_ = jax.jit(loaded_model.apply)(variables, {"image": images, "text": ids.astype(np.int32)})
    img, txt = np.asarray(out_["image_embeds"]), np.asarray(out_["text_embeds"])
    ref = _hf_reference(model, images, ids)
    logits = np.exp(float(out_["logit_scale"])) * img @ txt.T
    _compare("CLI --source=hf --scan + colearn_jax.load", (img, txt, logits), ref)

    # A second conversion into the same directory is refused (exit code 2, message on stderr).
    assert cli_main(["--source=hf", f"--input={path}", f"--output={out}"]) == 2


def test_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        cc.convert("open_clip", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="Unknown source 'timm'"):
        cc.convert("timm", str(tmp_path))
    with pytest.raises(SystemExit):  # argparse rejects unknown sources
        cli_main(["--source=timm", "--input=x", "--output=y"])
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 32)
    with pytest.raises(torch_reader.CheckpointFormatError, match="not a valid safetensors file"):
        cc.convert("open_clip", str(bad))
    assert cli_main(["--source=open_clip", f"--input={bad}", f"--output={tmp_path / 'o'}"]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="config.json"):
        cc.convert("hf", str(tmp_path))
    # .pt / .bin need torch; without it the message says so.
    pt = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(2)}, str(pt))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch"):
        torch_reader.read_state_dict(str(pt))


def test_safetensors_bfloat16_and_float16_are_read_without_torch(tmp_path):
    from safetensors.torch import save_file  # noqa: PLC0415

    a = torch.randn(3, 4).to(torch.bfloat16)
    b = torch.randn(5).to(torch.float16)
    path = tmp_path / "w.safetensors"
    save_file({"a": a, "b": b}, str(path))
    sd = torch_reader.read_state_dict(str(path))
    assert sd["a"].dtype == np.float32 and sd["b"].dtype == np.float32
    np.testing.assert_array_equal(sd["a"], a.float().numpy())
    np.testing.assert_array_equal(sd["b"], b.float().numpy())
