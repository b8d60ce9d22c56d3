"""Each benchmark's --smoke mode runs as a script and writes JSON with the expected keys."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED = {
    'sampler_speed': {
        'top': ['forward', 'results', 'loop', 'student_speedup_cached', 'machine'],
        'results': ['teacher_cached', 'teacher_uncached', 'student_cached',
                    'student_uncached'],
        'fields': ['median_s', 'seconds_per_sample', 'tokens_per_second', 'overhead',
                   'batch_forward_passes', 'mean_nfe_per_sample'],
    },
    'trainer_speed': {
        'top': ['matmul_peak_flops_per_second', 'results', 'ratio_mcd_over_teacher',
                'machine'],
        'results': ['teacher_step', 'mcd_step'],
        'fields': ['median_s', 'tokens_per_second', 'model_flops_per_second', 'mfu'],
    },
    'ar_baseline': {
        'top': ['results', 'kv_cache_speedup', 'student_speedup_over_ar_cached', 'machine'],
        'results': ['ar_cached', 'ar_uncached', 'mcd_student'],
        'fields': ['median_s', 'seconds_per_sample', 'tokens_per_second', 'model_calls'],
    },
}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_benchmark_smoke_writes_json(name, tmp_path):
  output = tmp_path / f'{name}.json'
  command = [sys.executable, os.path.join(REPO, 'benchmarks', f'{name}.py'), '--smoke',
             '--output', str(output)]
  completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             cwd=str(tmp_path))
  assert completed.returncode == 0, completed.stderr[-3000:]

  report = json.loads(output.read_text(encoding='utf-8'))
  expected = EXPECTED[name]
  for key in expected['top']:
    assert key in report, key
  assert sorted(report['results']) == sorted(expected['results'])
  for result_name, result in report['results'].items():
    for field in expected['fields']:
      assert field in result, (result_name, field)
      assert math.isfinite(result[field]), (result_name, field)
      assert result[field] > 0, (result_name, field)
  for key in ('backend', 'cpu_model', 'date', 'jax_version'):
    assert report['machine'][key], key


def test_plot_curves_reads_resumed_runs(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  records = [{'step': 10, 'loss': 2.0}, {'step': 10, 'val_elbo_bits_per_token': 3.0},
             {'step': 20, 'val_elbo_bits_per_token': 2.5},
             {'step': 20, 'val_elbo_bits_per_token': 2.4}]  # Logged again after a resume.
  (workdir / 'metrics.jsonl').write_text(
      ''.join(json.dumps(record) + '\n' for record in records), encoding='utf-8')
  output = tmp_path / 'curves.png'

  completed = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'plot_curves.py'), str(workdir),
       '--output', str(output)], capture_output=True, text=True, timeout=120)

  assert completed.returncode == 0, completed.stderr[-3000:]
  assert output.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  try:
    import plot_curves  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  assert plot_curves.read_validation(str(workdir)) == {
      'val_elbo_bits_per_token': [(10, 3.0), (20, 2.4)]}


def table_row(model: str, steps: int, gen_ppl: float, temperature: float = 1.0) -> dict:
  return {'model': model, 'sampler': 'ancestral', 'steps': steps, 'temperature': temperature,
          'nfe': float(steps), 'seconds_per_sample': 0.1, 'gen_ppl': gen_ppl,
          'gen_ppl_low': gen_ppl - 1, 'gen_ppl_high': gen_ppl + 1, 'entropy': 2.9}


def test_merge_tables_replaces_matching_rows(tmp_path):
  first = {'rows': [table_row('teacher', 16, 17.0), table_row('control', 16, 16.5, 0.97),
                    table_row('teacher', 8, 23.0)]}
  second = {'rows': [table_row('control', 16, 16.0, 0.95), table_row('control', 8, 21.0, 0.96)]}
  paths = []
  for index, table in enumerate((first, second)):
    paths.append(tmp_path / f'table_{index}.json')
    paths[-1].write_text(json.dumps(table), encoding='utf-8')
  output = tmp_path / 'merged'

  completed = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'merge_tables.py'),
       *map(str, paths), '--output', str(output)],
      capture_output=True, text=True, timeout=120, cwd=REPO)

  assert completed.returncode == 0, completed.stderr[-3000:]
  merged = json.loads((output / 'table.json').read_text(encoding='utf-8'))
  assert [(row['model'], row['steps'], row['gen_ppl']) for row in merged['rows']] == [
      ('teacher', 16, 17.0), ('control', 16, 16.0), ('teacher', 8, 23.0), ('control', 8, 21.0)]
  assert [row['gen_ppl'] for row in merged['replaced']] == [16.5]
  assert len(merged['sources']) == 2
  assert (output / 'gen_ppl_vs_nfe.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert len((output / 'table.md').read_text(encoding='utf-8').splitlines()) == 2 + 4


def test_merge_tables_missing_file(tmp_path):
  completed = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'merge_tables.py'),
       str(tmp_path / 'none.json'), '--output', str(tmp_path / 'out')],
      capture_output=True, text=True, timeout=120, cwd=REPO)

  assert completed.returncode == 1
  assert 'none.json not found' in completed.stderr
