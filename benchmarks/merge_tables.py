r"""Merges quality-speed tables, so that rows measured again replace the earlier ones.

  python benchmarks/merge_tables.py workdirs/mcd_gutenberg/results/table.json \
      workdirs/mcd_gutenberg_controls/results/table.json \
      --output workdirs/mcd_gutenberg/merged --title "Gutenberg, teacher N0 = 256"

Rows are matched on (model, sampler, steps). A row of a later table replaces
the matching row of the earlier ones in place, and a row that matches none is
appended. Writes table.json (with the source files and every replaced row),
table.md and gen_ppl_vs_nfe.png into --output. Nothing is sampled or scored.
"""

import argparse
import json
import os

from mcd_jax import quality


def row_key(row: dict) -> tuple:
  return row['model'], row.get('sampler', 'ancestral'), row['steps']


def merge(tables: list[dict]) -> tuple[list[dict], list[dict]]:
  """Returns (merged rows, replaced rows) of tables given oldest first."""
  merged, replaced = [], []
  for table in tables:
    for row in table['rows']:
      keys = [row_key(old) for old in merged]
      if row_key(row) in keys:
        index = keys.index(row_key(row))
        replaced.append(merged[index])
        merged[index] = row
      else:
        merged.append(row)
  return merged, replaced


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('tables', nargs='+', help='table.json files, oldest first')
  parser.add_argument('--output', required=True, help='folder for the merged table')
  parser.add_argument('--title', default='Gen PPL against NFE')
  args = parser.parse_args()

  tables = []
  for path in args.tables:
    if not os.path.isfile(path):
      raise SystemExit(f'error: {path} not found. Pass the results/table.json of a '
                       'pipeline or evaluate run.')
    with open(path, encoding='utf-8') as f:
      tables.append(json.load(f))

  rows, replaced = merge(tables)
  summary = {'sources': [os.path.abspath(path) for path in args.tables], 'replaced': replaced}
  quality.write_results(args.output, rows, summary, args.title)
  print(quality.format_table(rows), end='')


if __name__ == '__main__':
  main()
