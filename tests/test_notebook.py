"""launch/colab.ipynb runs from top to bottom in a fresh kernel, shrunk to a 4-step tiny model."""

import os

import nbformat
from nbclient import NotebookClient

from test_train import TINY_OVERRIDES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")
# test_train.py's CLI run's tiny model: the same programs, so one of the two finds them in the
# run's compilation cache (the step count only sets where the pictures are taken).
STEPS = 4


def cell_outputs(notebook, marker):
  """The outputs of the one code cell whose source contains `marker`."""
  cells = [cell for cell in notebook.cells if cell.cell_type == "code" and marker in cell.source]
  assert len(cells) == 1, marker
  return cells[0].outputs


def printed(outputs):
  return "".join(output.get("text", "") for output in outputs if output.output_type == "stream")


def pictures(outputs):
  return [output for output in outputs if "image/png" in output.get("data", {})]


def test_the_notebook_trains_the_demo_and_shows_its_pictures(tmp_path, monkeypatch):
  # The tiny model of tests/test_train.py, evaluated, checkpointed and pictured at each step.
  overrides = {**TINY_OVERRIDES, "log_every": STEPS, "eval_every": STEPS,
               "checkpoint_every": STEPS, "image_summary_every": STEPS}
  flags = [f"--config.{name}={value}" for name, value in overrides.items()
           if name != "total_steps"]
  flags.append(f"--config.data.data_dir={tmp_path / 'tfds'}")
  workdir = tmp_path / "run"
  monkeypatch.setenv("PSEUDOSEG_NOTEBOOK_STEPS", str(STEPS))
  monkeypatch.setenv("PSEUDOSEG_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("PSEUDOSEG_NOTEBOOK_FLAGS", " ".join(flags))
  monkeypatch.setenv("PSEUDOSEG_NOTEBOOK_INSTALL", "no")  # This environment has the packages.
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  assert all(not cell.get("outputs") for cell in notebook.cells), "commit it without outputs"

  # Started in launch/, as Jupyter starts a notebook's kernel in the notebook's folder.
  client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  try:
    client.execute()  # Raises CellExecutionError, with the cell and its traceback, on a failure.
  finally:
    nbformat.write(notebook, tmp_path / "executed.ipynb")  # For a look after a failure.

  assert "val/miou = " in printed(cell_outputs(notebook, "pseudoseg_jax.main"))
  assert f"at step {STEPS}; IoU per class" in printed(cell_outputs(notebook, "results.json"))
  assert len(pictures(cell_outputs(notebook, "learning_curves.png"))) == 1
  summaries = cell_outputs(notebook, "show_last_image(\"pseudo_labels\"")
  assert f"Pseudo-label grid at step {STEPS}" in printed(summaries)
  assert f"Confusion matrix at step {STEPS}" in printed(summaries)
  assert len(pictures(summaries)) == 2
  predictions = cell_outputs(notebook, "pseudoseg_jax.predict")
  if "Skipped" not in printed(predictions):
    assert len(pictures(predictions)) == 4
    assert len(list((workdir / "predictions").glob("*_overlay.jpg"))) == 4
  assert (workdir / "learning_curves.png").is_file()


def notebook_function(name):
  """A function defined in the notebook's install cell, compiled on its own (the cell itself
  clones and installs when run)."""
  import ast
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  (cell,) = [cell for cell in notebook.cells if cell.cell_type == "code"
             and f"def {name}(" in cell.source]
  (definition,) = [node for node in ast.parse(cell.source).body
                   if isinstance(node, ast.FunctionDef) and node.name == name]
  namespace = {}
  exec("import re, urllib.parse\n" + ast.get_source_segment(cell.source, definition), namespace)
  return namespace[name]


def test_in_colab_the_notebook_clones_the_repository_it_was_opened_from():
  repository_of = notebook_function("repository_of")
  expected = ("https://github.com/someone/pseudoseg-jax.git", "main")
  # The Jupyter session path Colab's kernel reports for a notebook opened from GitHub, and the
  # address in the browser.
  assert repository_of("fileId=https%3A%2F%2Fgithub.com%2Fsomeone%2Fpseudoseg-jax%2Fblob%2Fmain"
                       "%2Flaunch%2Fcolab.ipynb") == expected
  assert repository_of("https://colab.research.google.com/github/someone/pseudoseg-jax/blob/"
                       "main/launch/colab.ipynb") == expected
  assert repository_of("fileId=https://github.com/someone/pseudoseg-jax/blob/0123abc/launch/"
                       "colab.ipynb") == ("https://github.com/someone/pseudoseg-jax.git", "0123abc")
  assert repository_of("fileId=1AbCdEf_drive_id") is None and repository_of("") is None
