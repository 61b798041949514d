#!/usr/bin/env python3
"""Plan stability: run each sample N times under `dynspec run` and count how often the same variants are installed.

A run's signature is the set of (region symbol, trigger offset in the region, trigger register) of every variant
installed at any time in the run (values and addresses change with ASLR; offsets do not). Prints, per sample, how
many runs share the most common signature, in how many runs a variant was entered, and every signature seen.

Usage: benches/stability.py [N] [SAMPLE...]     (N runs per sample, default 10; default every sample)
Needs `make -C samples` and `cargo build --release` first.
"""
import collections
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DYNSPEC = os.environ.get("DYNSPEC", os.path.join(ROOT, "target/release/dynspec"))
BUILD = os.path.join(ROOT, "samples/build")
# Sizes that run long enough for the periodic looks and re-plans the samples exercise (0.5-5 s natively).
SIZES = {
    "interp_switch": "20000000", "bpf_filter": "100000000", "config_loop": "1000000",
    "patch_once": "400000", "late_start": "30000000", "selfmod_interp": "3200000",
    "sig_interp": "20000000", "mt_interp": "1200000", "late_thread": "8000000", "nothing": "3200",
    "signals": "100000", "fork_exec": "10000000", "kernel_read": "160000", "vfork_guard": "6000000",
}


def signature(report):
    sig = set()
    for v in report["variants"]:
        t = v["trigger"]
        off = int(t["address"], 16) - int(v["region"]["start"], 16) if t else None
        sig.add((v["region"]["symbol"], off, t["register"] if t else None))
    return tuple(sorted(sig, key=str))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    names = sys.argv[2:] or list(SIZES)
    for name in names:
        sigs = collections.Counter()
        entered = 0
        for _ in range(n):
            with tempfile.TemporaryDirectory() as d:
                rep = os.path.join(d, "r.json")
                subprocess.run([DYNSPEC, "run", "-q", "-o", rep, "--", os.path.join(BUILD, name), SIZES.get(name, "")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                try:
                    with open(rep) as f:
                        r = json.load(f)
                except (OSError, ValueError):
                    sigs["no report"] += 1
                    continue
            sigs[signature(r)] += 1
            entered += any(v["entries"] > 0 for v in r["variants"])
        top = sigs.most_common(1)[0][1] if sigs else 0
        print(f"{name}: {top}/{n} runs the same, variants entered in {entered}/{n}, {len(sigs)} distinct")
        for s, c in sigs.most_common():
            print(f"   {c}x {s}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
