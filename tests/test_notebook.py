"""Runs notebooks/sampling.ipynb with nbclient on a tiny teacher and student trained here."""

import os

import nbclient
import nbformat
import pytest

from mcd_jax import train
from test_train import tiny_config
from test_train import tiny_distill_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'sampling.ipynb')
PROMPT = 'In the'
NUM_SAMPLES = 2


def teacher_config():
  config = tiny_config(num_steps=2)
  config.data.seq_len = 32  # Room for the prompt and a continuation.
  config.model.num_layers = 1
  config.train.eval_batches = 1
  return config


def student_config(teacher_workdir: str):
  config = tiny_distill_config(teacher_workdir, base_steps=4, num_rounds=1, steps_per_round=1)
  config.train.eval_batches = 1
  return config


def stream_text(notebook) -> str:
  """The stdout and stderr of every code cell, in order."""
  parts = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      if output.get('output_type') == 'stream':
        parts.append(output['text'])
  return ''.join(parts)


@pytest.mark.slow
def test_sampling_notebook_runs(tmp_path, monkeypatch):
  teacher, student = str(tmp_path / 'teacher'), str(tmp_path / 'student')
  train.train_and_evaluate(teacher_config(), teacher)
  train.train_and_evaluate(student_config(teacher), student)
  monkeypatch.setenv('MCD_NOTEBOOK_WORKDIR', teacher)
  monkeypatch.setenv('MCD_NOTEBOOK_STUDENT_WORKDIR', student)
  monkeypatch.setenv('MCD_NOTEBOOK_PROMPT', PROMPT)
  monkeypatch.setenv('MCD_NOTEBOOK_NUM_SAMPLES', str(NUM_SAMPLES))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')

  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()  # Raises CellExecutionError, with the traceback, if a cell fails.

  text = stream_text(notebook)
  # The teacher samples in its config's 4 steps, the student in N0 / 2 = 2.
  for header in ('teacher, unconditional, 4 steps', 'teacher, prompt, 4 steps',
                 'student, unconditional, 2 steps', 'student, prompt, 2 steps'):
    assert f'===== {header}, mean NFE' in text, text[-3000:]
  # The character tokenizer decodes the prompt back to itself, so every
  # prompted sample starts with it: 2 samples each for teacher and student.
  assert text.count(f'--- sample 0\n{PROMPT}') == 2, text[-3000:]
  assert text.count(f'--- sample 1\n{PROMPT}') == 2, text[-3000:]
  assert 'steady state (s)' in text
  timing_rows = [line for line in text.splitlines()
                 if line.startswith(('teacher ', 'student ')) and line.rstrip()[-1].isdigit()]
  assert len(timing_rows) == 4, timing_rows
