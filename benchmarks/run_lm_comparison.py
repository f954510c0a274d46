#!/usr/bin/python3
"""Trains the same small decoder LMs in mixmoe (bench_lm) and PyTorch eager on CPU
(torch_lm.py) in one run, interleaved, and writes the comparison.

  /usr/bin/python3 benchmarks/run_lm_comparison.py --bench build/release/benchmarks/bench_lm

PyTorch is run twice per model: "fair" (2 threads, OMP_WAIT_POLICY=PASSIVE, the
setting that avoids OpenMP and OpenBLAS threads spinning against each other) and
"default" (Debian's defaults); ratios are quoted against the fair figure.
Writes docs/results/lm_comparison.json, a Markdown table on stdout and, when
matplotlib is present, docs/img/lm_comparison.png.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(cmd, env_extra):
    env = dict(os.environ)
    env.update(env_extra)
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default=os.path.join(ROOT, "build/release/benchmarks/bench_lm"))
    p.add_argument("--models", default="dense,moe,mixed-fourier")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "docs/results/lm_comparison.json"))
    a = p.parse_args()
    if not os.path.exists(a.bench):
        sys.exit(f"run_lm_comparison: {a.bench} not found; build it with: cmake --build --preset release --target bench_lm")
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup)]
    runners = {
        "mixmoe": lambda m: run([a.bench, "--model", m] + common,
                                {"MIXMOE_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}),
        "torch_fair": lambda m: run(["/usr/bin/python3", os.path.join(HERE, "torch_lm.py"), "--model", m, "--threads", "2"]
                                    + common, {"OMP_WAIT_POLICY": "PASSIVE"}),
        "torch_default": lambda m: run(["/usr/bin/python3", os.path.join(HERE, "torch_lm.py"), "--model", m,
                                        "--threads", "0"] + common, {}),
    }
    results = {}
    load_before = loadavg()
    for model in a.models.split(","):
        runs = {k: [] for k in runners}
        for r in range(a.repeats):
            for name, fn in runners.items():  # interleaved, so drifting load hits all alike
                res = fn(model)
                runs[name].append(res)
                print(f"# {model} {name} repeat {r}: {res['tokens_per_s']:.0f} tokens/s, {res['peak_rss_mib']:.0f} MiB",
                      file=sys.stderr)
        results[model] = {
            name: {
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                "tokens_per_s_all": [x["tokens_per_s"] for x in rs],
                "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in rs),
                "params": rs[0]["params"],
            }
            for name, rs in runs.items()
        }
    doc = {"load_before": load_before, "load_after": loadavg(), "steps": a.steps, "repeats": a.repeats,
           "results": results}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"machine load (1-min average) before {doc['load_before']:.2f}, after {doc['load_after']:.2f}\n")
    print("| model | params | mixmoe tokens/s | PyTorch fair | PyTorch default | mixmoe / fair | "
          "mixmoe peak RSS MiB | PyTorch fair peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for model, r in results.items():
        m, f, d = r["mixmoe"], r["torch_fair"], r["torch_default"]
        print(f"| {model} | {m['params'] / 1e6:.1f}M | {m['tokens_per_s']:.0f} | {f['tokens_per_s']:.0f} | "
              f"{d['tokens_per_s']:.0f} | {m['tokens_per_s'] / f['tokens_per_s']:.2f} | {m['peak_rss_mib']:.0f} | "
              f"{f['peak_rss_mib']:.0f} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)", file=sys.stderr)
        return
    models = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.27
    for i, (name, label) in enumerate([("mixmoe", "mixmoe"), ("torch_fair", "PyTorch (2 threads, passive)"),
                                       ("torch_default", "PyTorch (defaults)")]):
        ax.bar([j + (i - 1) * width for j in range(len(models))], [results[m][name]["tokens_per_s"] for m in models],
               width, label=label)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("training tokens/s (higher is better)")
    ax.set_title("Decoder LM, vocab 8000, d 256, 4 layers, seq 64, batch 32, 2 cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(ROOT, "docs/img/lm_comparison.png")
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
