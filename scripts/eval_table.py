#!/usr/bin/env python3
"""Markdown table of kvpack-eval results (the README's tables are made with it).

usage: scripts/eval_table.py RESULTS.json [RESULTS.json ...]

One row per policy row of each file (kvpack-eval --json), in file order; a policy label seen in
an earlier file is skipped (each file repeats the full-cache row).
"""
import json
import sys


def cell(x, fmt):
    return "—" if x is None else format(x, fmt)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("| policy | bytes ratio | agreement@1 | agreement, decisive | KL | perplexity | retrieval "
          "| retrieval bytes ratio |")
    print("|---|---|---|---|---|---|---|---|")
    seen = set()
    for path in sys.argv[1:]:
        with open(path) as fh:
            doc = json.load(fh)
        for r in doc["results"]:
            if r["policy"] in seen:
                continue
            seen.add(r["policy"])
            print(
                f"| {r['policy']} | {cell(r.get('bytes_ratio'), '.2f')} "
                f"| {cell(r.get('agreement_top1'), '.3f')} "
                f"| {cell(r.get('agreement_decisive'), '.3f')} | {cell(r.get('kl'), '.4f')} "
                f"| {cell(r.get('perplexity'), '.2f')} | {cell(r.get('retrieval_acc'), '.2f')} "
                f"| {cell(r.get('retrieval_bytes_ratio'), '.2f')} |"
            )


if __name__ == "__main__":
    main()
