"""The built wheel works on its own: build it from a copy of the checkout, install it (not editable)
into an empty directory, and, from outside the checkout with only that directory and the installed
dependencies on the path, convert an open_clip checkpoint with `python -m colearn_jax.convert`, then
`colearn_jax.load` it and encode an image. This proves the package configs
(`colearn_jax/configs/`, which the converter and `colearn_jax.load` need) ship inside the wheel."""
import glob
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tests.helpers import ROOT
from tests.torch_references import open_clip_model, open_clip_reference, random_inputs

OC_TINY = dict(embed_dim=16, quick_gelu=False,
               vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
               text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
# Not part of the source tree: build outputs, caches, VCS data (stale build/ files could enter the wheel).
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
                                    ".tfds_test_cache", ".benchmarks", "runs", "tmp", ".whl", ".gl", "gpu_suite_out")

LOAD_AND_ENCODE = """
import json, sys
import jax, numpy as np
import colearn_jax
model, variables, config = colearn_jax.load(sys.argv[1])
images = np.load(sys.argv[2])
emb = model.apply(variables, images, method=model.encode_image)  # L2-normalised
print(json.dumps({"file": colearn_jax.__file__, "image_size": config.model.vision.image_size,
                  "embeds": np.asarray(emb).tolist()}))
"""


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _isolated_env(site_dir):
    """`python -S` with an explicit path: the wheel's install directory, then the interpreter's
    site-packages for the dependencies. -S skips site-packages' .pth files, so an editable install of
    some checkout (a path entry or an import hook) cannot shadow the wheel."""
    deps = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = os.pathsep.join([site_dir] + deps)
    return env


@pytest.mark.slow
def test_wheel_installs_converts_and_loads(tmp_path):
    src, wheels, site_dir, work = (tmp_path / d for d in ("src", "wheels", "site", "work"))
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(wheels), str(src)], cwd=str(tmp_path))
    (wheel,) = glob.glob(str(wheels / "colearn_jax-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for needed in ("colearn_jax/configs/__init__.py", "colearn_jax/configs/base.py", "colearn_jax/configs/clip.py",
                   "colearn_jax/convert/__main__.py"):
        assert needed in names, f"{needed} is not in {os.path.basename(wheel)}"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site_dir), wheel])

    work.mkdir()
    model = open_clip_model(OC_TINY, seed=7)
    import torch  # noqa: PLC0415

    torch.save(model.state_dict(), str(work / "tiny.pt"))
    (work / "tiny.json").write_text(json.dumps(OC_TINY))
    images, ids = random_inputs(2, 16, 8, 64, [7, 3], seed=8)
    np.save(work / "images.npy", images)

    env = _isolated_env(str(site_dir))
    py = [sys.executable, "-S"]
    out = work / "converted"
    proc = _run(py + ["-m", "colearn_jax.convert", "--source=open_clip", "--input=tiny.pt",
                      "--model_config=tiny.json", f"--output={out}"], cwd=str(work), env=env)
    assert "ViT 16px patch 8 width 32 x1" in proc.stdout
    result = json.loads(_run(py + ["-c", LOAD_AND_ENCODE, str(out), "images.npy"], cwd=str(work),
                             env=env).stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(site_dir) + os.sep), f"imported {result['file']}, not the wheel"
    assert result["image_size"] == 16
    ref_images, _, _ = open_clip_reference(model, images, ids)
    np.testing.assert_allclose(np.asarray(result["embeds"]), ref_images, atol=1e-4)
