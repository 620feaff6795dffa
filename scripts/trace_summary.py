#!/usr/bin/env python3
"""Operators of a Chrome trace (`tpp --profile-trace FILE`, or torch.profiler's export_chrome_trace) by
self time: what each operator spent outside the operators it called, summed per name; CUDA kernels and
copies (rows named `gpu: ...`) by their own duration.

    python scripts/trace_summary.py TRACE.json [--top 30] [--compare OTHER.json]

With --compare, both traces side by side (milliseconds per trace, and the difference). Only the standard
library is needed.
"""
import argparse
import json
from collections import defaultdict


def self_times(path):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    by_tid = defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if e.get("cat") in ("cpu_op", "Operator", None):
            by_tid[(e.get("pid"), e.get("tid"))].append(e)
        elif e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            # Device work, on its own stream rows: named apart from the host operators that launched it.
            by_tid[("gpu", e.get("pid"), e.get("tid"))].append(dict(e, name="gpu: " + e.get("name", "?")))
    out, calls = defaultdict(float), defaultdict(int)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, name, child time]
        for e in evs:
            start, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][0] <= start:
                done = stack.pop()
                out[done[1]] += done[3] - done[2]
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([end, e["name"], 0.0, e["dur"]])
            calls[e["name"]] += 1
        for done in stack:
            out[done[1]] += done[3] - done[2]
    return {k: v / 1e3 for k, v in out.items()}, calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--compare")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    t, n = self_times(a.trace)
    if not a.compare:
        total = sum(t.values())
        print(f"{'operator':<48} {'calls':>8} {'self ms':>10} {'share':>7}")
        for k, v in sorted(t.items(), key=lambda kv: -kv[1])[: a.top]:
            print(f"{k[:48]:<48} {n[k]:>8} {v:>10.1f} {100 * v / total:>6.1f}%")
        print(f"{'total':<48} {sum(n.values()):>8} {total:>10.1f}")
        return
    u, m = self_times(a.compare)
    keys = sorted(set(t) | set(u), key=lambda k: -abs(t.get(k, 0) - u.get(k, 0)))
    print(f"{'operator':<44} {'calls A':>8} {'ms A':>9} {'calls B':>8} {'ms B':>9} {'A - B':>9}")
    for k in keys[: a.top]:
        print(f"{k[:44]:<44} {n.get(k, 0):>8} {t.get(k, 0):>9.1f} {m.get(k, 0):>8} {u.get(k, 0):>9.1f} "
              f"{t.get(k, 0) - u.get(k, 0):>9.1f}")
    print(f"{'total':<44} {sum(n.values()):>8} {sum(t.values()):>9.1f} {sum(m.values()):>8} {sum(u.values()):>9.1f}")


if __name__ == "__main__":
    main()
