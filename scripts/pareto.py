#!/usr/bin/env python3
"""Pareto plot of kvpack-eval results: bytes ratio vs retrieval accuracy and vs top-1 agreement.

usage: scripts/pareto.py OUT.png RESULTS.json [RESULTS.json ...]

Every row of every JSON file (kvpack-eval --json) is a point; the frontier of each panel (no
other point has both a higher bytes ratio and a higher metric) is drawn as a line. Rows of the
same policy family share a colour. Needs gnuplot (Debian: gnuplot-nox).
"""
import json
import os
import subprocess
import sys
import tempfile


PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
           "#666666", "#1f78b4", "#b2df8a", "#fb9a99", "#cab2d6"]


def family(label):
    name = label.split()[0]
    if name.startswith("quant"):
        return "quant"
    return name.split("+")[0] + ("+quant" if "+quant" in name else "")


def frontier(points):
    """Points not dominated in (ratio up, metric up), sorted by ratio."""
    best = []
    for r, m, _ in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not best or m > best[-1][1]:
            best.append((r, m))
    return sorted(best)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, files = sys.argv[1], sys.argv[2:]
    rows = []
    for f in files:
        with open(f) as fh:
            doc = json.load(fh)
        for r in doc["results"]:
            # Each panel at the bytes ratio measured on its own inputs.
            text_ratio, task_ratio = r.get("bytes_ratio"), r.get("retrieval_bytes_ratio")
            # Retrieval from fewer than 5 questions is not a measurement worth plotting.
            asked = r.get("retrieval_asked", 0)
            if r.get("retrieval_acc") is not None and task_ratio and asked >= 5:
                rows.append((task_ratio, r["retrieval_acc"], None, r["policy"]))
            if r.get("agreement_top1") is not None and text_ratio:
                rows.append((text_ratio, None, r["agreement_top1"], r["policy"]))
    if not rows:
        sys.exit("pareto: no rows with a bytes ratio")
    families = sorted({family(r[3]) for r in rows})
    tmp = tempfile.mkdtemp(prefix="kvpack-pareto-")
    script = [
        "set terminal pngcairo size 1400,560 font 'sans,10'",
        f"set output '{out}'",
        "set multiplot layout 1,2 title 'kvpack on SmolLM2-135M-Instruct: quality vs measured "
        "memory (bytes ratio = dense fp16 / bytes())'",
        "set logscale x 2",
        "set xlabel 'bytes ratio (higher = smaller cache)'",
        "set key bottom left",
        "set grid",
        "set yrange [0:1.05]",
    ]
    for col, metric in ((1, "retrieval accuracy"), (2, "top-1 agreement with the full cache")):
        plots = []
        for i, fam in enumerate(families):
            points = [r for r in rows if family(r[3]) == fam and r[col] is not None]
            if not points:
                continue
            path = os.path.join(tmp, f"{col}_{i}.dat")
            with open(path, "w") as fh:
                fh.writelines(f"{r[0]} {r[col]}\n" for r in points)
            # Colour and marker both vary, so no two families look alike.
            plots.append(
                f"'{path}' using 1:2 with points pt {5 + 2 * (i % 4)} "
                f"lc rgb '{PALETTE[i % len(PALETTE)]}' ps 1.3 "
                f"title '{fam}'"
            )
        front = frontier([(r[0], r[col], r[3]) for r in rows if r[col] is not None])
        path = os.path.join(tmp, f"front_{col}.dat")
        with open(path, "w") as fh:
            fh.writelines(f"{r} {m}\n" for r, m in front)
        plots.append(f"'{path}' using 1:2 with linespoints lw 2 pt 6 ps 1.8 lc rgb 'black' title 'Pareto frontier'")
        script.append(f"set ylabel '{metric}'")
        script.append("plot " + ", ".join(plots))
    script.append("unset multiplot")
    subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=True)
    print(out)


if __name__ == "__main__":
    main()
