"""Shared test settings: where the public-domain corpora are, and a tiny config."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(REPO), 'shared', 'data')


@pytest.fixture(scope='session')
def data_dir():
  """$MCD_DATA_DIR, or ../shared/data beside the repository."""
  path = os.environ.get('MCD_DATA_DIR', DEFAULT_DATA_DIR)
  if not os.path.isdir(path):
    pytest.skip(f'corpus folder {path} not found; set MCD_DATA_DIR')
  return path
