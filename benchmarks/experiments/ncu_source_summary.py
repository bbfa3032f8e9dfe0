"""Summarise ``ncu --page source --print-source sass --csv`` output of one kernel: stall samples per code
region (before the main loop, the main loop, after it) and the instructions with the most samples.

The main loop is the backward branch's range that holds the most HMMA instructions. Usage:
``python benchmarks/ncu_source_summary.py src.csv [top]``.
"""

from __future__ import annotations

import csv
import re
import sys


def main(argv: list[str]) -> int:
    path, top = argv[0], int(argv[1]) if len(argv) > 1 else 25
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"#"') or line.startswith('"Address"'))
    rows = list(csv.DictReader(lines[start:]))
    cols = rows[0].keys()
    samp = next(c for c in cols if c.startswith("Warp Stall Sampling (All"))
    src = next(c for c in cols if c == "Source")
    addr = [int(r["Address"], 16) for r in rows]
    text = [r[src] for r in rows]
    n = [float(r[samp] or 0) for r in rows]
    loops = []
    for i, t in enumerate(text):
        m = re.search(r"BRA\s+`?\(?\.?L?_?x?_?(?:0x)?([0-9a-fA-F]+)", t)
        if m and "BRA" in t:
            try:
                tgt = int(m.group(1), 16)
            except ValueError:
                continue
            if tgt < addr[i]:
                j = addr.index(tgt) if tgt in addr else None
                if j is not None:
                    loops.append((sum("HMMA" in x for x in text[j:i + 1]), j, i))
    total = sum(n)
    print(f"{len(rows)} instructions, {total:.0f} stall samples")
    if loops:
        _, j, i = max(loops)
        parts = {"before the main loop": sum(n[:j]), "main loop": sum(n[j:i + 1]), "after it (tail, merge)": sum(n[i + 1:])}
        for k, v in parts.items():
            print(f"  {k:24s} {v:9.0f}  {v / max(total, 1):6.1%}")
    reasons = [c for c in cols if c.startswith("stall_") or "Stall" in c and c != samp]
    order = sorted(range(len(rows)), key=lambda k: -n[k])[:top]
    for k in order:
        print(f"  {addr[k]:#07x} {n[k]:7.0f} {n[k] / max(total, 1):6.1%}  {text[k][:70]}")
    _ = reasons
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
