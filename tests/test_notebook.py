"""notebooks/diagnostics.ipynb run headless (nbclient, a real ipykernel) on a tiny run.

The run is a real one: a short Pendulum-v1 training run through the CLI, made by the test.
"""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

import nbclient
import nbformat
import pytest

from lit_td3 import report
from tests.test_cli import lit_td3, small_run_config

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "diagnostics.ipynb"


def code_cell(notebook: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    return next(
        c
        for c in notebook.cells
        if c.cell_type == "code" and c.source.strip() == source
    )


def pngs(cell: nbformat.NotebookNode) -> list[bytes]:
    return [
        base64.b64decode(o["data"]["image/png"])
        for o in cell.outputs
        if "image/png" in o.get("data", {})
    ]


@pytest.fixture(scope="module")
def executed(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[nbformat.NotebookNode, report.Run]:
    tmp = tmp_path_factory.mktemp("notebook")
    config = small_run_config(tmp, every=200, env_id="Pendulum-v1", total=200, learning_starts=50,
                              episode_steps=50, extra={"model": {"log_every_n_env_steps": 10},
                                                       "data": {"batch_size": 16}})
    trained = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config))
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp / "run"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    patch = pytest.MonkeyPatch()
    # The kernel is a child process: it inherits these.
    patch.setenv("LIT_TD3_RUN_DIR", str(run_dir))
    patch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    try:
        nbclient.NotebookClient(
            notebook,
            timeout=120,
            kernel_name="python3",
            resources={"metadata": {"path": str(run_dir.parent)}},
        ).execute()
    finally:
        patch.undo()
    return notebook, report.load_run(run_dir)


def test_notebook_runs_without_errors_on_the_run_from_the_env_var(
    executed: tuple[nbformat.NotebookNode, report.Run],
) -> None:
    notebook, run = executed
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"]
    first = notebook.cells[1].outputs[0]["text"]
    assert str(run.run_dir) in first
    assert f"{len(run.tags)} scalar tags" in first


@pytest.mark.parametrize("group", ["gradients", "losses", "q_values", "episodes"])
def test_notebook_draws_every_figure_of_each_group(
    executed: tuple[nbformat.NotebookNode, report.Run], group: str
) -> None:
    notebook, run = executed
    images = pngs(code_cell(notebook, f'show("{group}")'))
    expected = report.plot_specs([run], group=group)
    assert len(expected) >= 2
    assert len(images) == len(expected)
    for image in images:
        assert image[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", image[16:24])
        assert width > 300
        assert height > 150


def test_notebook_judges_the_run_on_the_criteria(
    executed: tuple[nbformat.NotebookNode, report.Run],
) -> None:
    notebook, _ = executed
    cell = next(
        c
        for c in notebook.cells
        if c.cell_type == "code" and "report.evaluate" in c.source
    )
    text = cell.outputs[0]["data"]["text/markdown"]
    for criterion in report.load_criteria():
        assert criterion.name in text
    # a state-only run has no CNN: those criteria are not applicable rather than failed
    assert "critic_cnn_grad_mean: n/a" in text
