"""notebooks/colab.ipynb runs end to end on CPU against a checkpoint written in the test.

The checkpoints are the `configs/clip.py:tiny`, `configs/simclr.py:tiny`, `configs/imagebind.py:tiny` and
`configs/coca.py:tiny` models with freshly initialised weights, written through
`colearn_jax.convert.writing.save_checkpoint` (the path converted checkpoints take) - the notebook only needs
something `colearn_jax.load` accepts, not a good model (the CoCa section's captions are junk bytes, which its
figure and printout must survive). The Colab-only install cell is guarded by `IN_COLAB` and is skipped here as well.
"""
import os
import re

import flax.linen as nn
import ipykernel  # noqa: F401  (the test extra installs the notebook runner and its kernel)
import jax
import nbclient
import nbformat
import numpy as np
import pytest

from tests.helpers import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab.ipynb")


def _tags(cell):
    return set(cell.get("metadata", {}).get("tags", []))


def _fresh_checkpoint(spec, tmp_path_factory):
    from colearn_jax.convert.writing import save_checkpoint  # noqa: PLC0415
    from colearn_jax.models import get_system  # noqa: PLC0415
    from colearn_jax.train.program import model_example_batch  # noqa: PLC0415

    config = load_config(spec)
    system = get_system(config.model.name)
    model = system.build_model(config)
    batch = model_example_batch(system, config, 2)
    variables = jax.jit(lambda b: model.init(jax.random.PRNGKey(0), b))(batch)
    variables = jax.tree.map(np.asarray, nn.unbox(variables))
    workdir = str(tmp_path_factory.mktemp("notebook_ckpt"))
    save_checkpoint(config, variables, workdir)
    return workdir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _fresh_checkpoint("clip.py:tiny", tmp_path_factory)


@pytest.fixture(scope="module")
def simclr_checkpoint(tmp_path_factory):
    return _fresh_checkpoint("simclr.py:tiny", tmp_path_factory)


@pytest.fixture(scope="module")
def imagebind_checkpoint(tmp_path_factory):
    return _fresh_checkpoint("imagebind.py:tiny", tmp_path_factory)


@pytest.fixture(scope="module")
def coca_checkpoint(tmp_path_factory):
    return _fresh_checkpoint("coca.py:tiny", tmp_path_factory)


def test_install_cell_is_guarded():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    install = [c for c in nb.cells if "install" in _tags(c)]
    assert len(install) == 1
    assert "if IN_COLAB:" in install[0].source and "%pip install" in install[0].source


def test_notebook_runs_end_to_end(checkpoint, simclr_checkpoint, imagebind_checkpoint, coca_checkpoint, tmp_path,
                                  monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if "install" not in _tags(c)]
    monkeypatch.setenv("COLEARN_JAX_CKPT", checkpoint)
    monkeypatch.setenv("COLEARN_JAX_SIMCLR_CKPT", simclr_checkpoint)
    monkeypatch.setenv("COLEARN_JAX_IMAGEBIND_CKPT", imagebind_checkpoint)
    monkeypatch.setenv("COLEARN_JAX_COCA_CKPT", coca_checkpoint)
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the traceback if any cell fails

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    by_tag = {t: c for c in nb.cells for t in _tags(c)}
    for tag in ("heatmap", "zeroshot", "retrieval", "simclr_neighbours", "imagebind_zeroshot", "coca_captions"):
        pngs = [o for o in by_tag[tag].outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
        assert pngs, f"the {tag!r} cell produced no figure"
    text = lambda c: "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")  # noqa: E731
    assert "zero-shot accuracy on these 20 images" in text(by_tag["zeroshot"])
    for modality in ("vision", "audio", "depth", "thermal", "imu"):  # every tiny tower was embedded and scored
        assert f"zero-shot from text prompts, {modality}" in text(by_tag["imagebind_zeroshot"])
    assert "a handwritten seven" in text(by_tag["retrieval"])
    assert "on the diagonal" in text(by_tag["heatmap"])
    assert "simclr" in text(by_tag["simclr_load"]) and "digit_scenes/single" in text(by_tag["simclr_load"])
    assert "20-NN top-1 on 200 test scenes" in text(by_tag["simclr_neighbours"])
    assert "coca" in text(by_tag["coca_load"]) and "digits_captions" in text(by_tag["coca_load"])
    captions = text(by_tag["coca_captions"])  # the tiny eval batch: 40 test digits, greedy captions
    assert re.search(r"captions naming every digit correctly on 40 held-out images: \d+%", captions), captions
    assert captions.count("  generated ") == 4 and "  reference " in captions
    assert re.search(r"zero-shot accuracy through the contrastive path on 40 digits_captions test images: \d+%",
                     text(by_tag["coca_zeroshot"]))
