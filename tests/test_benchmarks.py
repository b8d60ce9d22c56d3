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
