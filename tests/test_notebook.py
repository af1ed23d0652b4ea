"""notebooks/colab.ipynb runs end to end on CPU against a checkpoint written in the test.

The checkpoint is the `configs/clip.py:tiny` model with freshly initialised weights, written through
`colearn_jax.convert.clip.save_checkpoint` (the path converted checkpoints take) - the notebook only
needs something `colearn_jax.load` accepts, not a good model. The Colab-only install cell is guarded
by `IN_COLAB` and is skipped here as well.
"""
import os

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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from colearn_jax.convert.clip import save_checkpoint  # noqa: PLC0415
    from colearn_jax.models.clip_system import build_model, example_batch  # noqa: PLC0415

    config = load_config("clip.py:tiny")
    model = build_model(config)
    batch = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), example_batch(config, 1))
    variables = jax.jit(lambda b: model.init(jax.random.PRNGKey(0), b))(batch)
    variables = jax.tree.map(np.asarray, nn.unbox(variables))
    workdir = str(tmp_path_factory.mktemp("notebook_ckpt"))
    save_checkpoint(config, variables, workdir)
    return workdir


def test_install_cell_is_guarded():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    install = [c for c in nb.cells if "install" in _tags(c)]
    assert len(install) == 1
    assert "if IN_COLAB:" in install[0].source and "%pip install" in install[0].source


def test_notebook_runs_end_to_end(checkpoint, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if "install" not in _tags(c)]
    monkeypatch.setenv("COLEARN_JAX_CKPT", checkpoint)
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the traceback if any cell fails

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    by_tag = {t: c for c in nb.cells for t in _tags(c)}
    for tag in ("heatmap", "zeroshot", "retrieval"):
        pngs = [o for o in by_tag[tag].outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
        assert pngs, f"the {tag!r} cell produced no figure"
    text = lambda c: "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")  # noqa: E731
    assert "zero-shot accuracy on these 20 images" in text(by_tag["zeroshot"])
    assert "a handwritten seven" in text(by_tag["retrieval"])
    assert "on the diagonal" in text(by_tag["heatmap"])
