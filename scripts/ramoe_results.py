#!/usr/bin/env python3
"""Writes the RA-MoE section of docs/results.md and its plots from examples/ramoe's results.json.

    /usr/bin/python3 scripts/ramoe_results.py runs-ramoe/ramoe/results.json docs

The section sits between <!-- ramoe:begin --> and <!-- ramoe:end --> (replaced when there,
appended otherwise; scripts/results.py keeps it when it rewrites the Mix-MoE part). Plots:
docs/img/ramoe_similarity.png (cross-lingual routing similarity per layer), ramoe_task_experts.png
(Δ of expert selection frequency, English task prompts minus general text, per router slot),
ramoe_predictor.png (RA-MoE gain against the ci proportion, per seed and language, with the fit).
"""
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from results import RAMOE_BEGIN as BEGIN, RAMOE_END as END  # noqa: E402  (scripts/results.py keeps the section)
METHODS = [
    ("base", "base (English task fine-tuning only)"),
    ("sft", "SFT on the train items of every language"),
    ("steer-soft", "Routing Steering, soft (base + λ·std on task experts' logits, middle layers)"),
    ("steer-hard", "Routing Steering, hard (task experts forced into the top-k, middle layers)"),
    ("rise", "RISE (only the selected experts fine-tuned)"),
    ("ramoe", "RA-MoE (SFT + routing alignment loss on ci items)"),
]


def mean_sd(values):
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, sd


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: ramoe_results.py RESULTS.json DOCS_DIR")
    with open(sys.argv[1], encoding="utf-8") as f:
        res = json.load(f)
    docs = sys.argv[2]
    img = os.path.join(docs, "img")
    os.makedirs(img, exist_ok=True)
    runs = res["runs"]
    langs = res["languages"]
    targets = langs[1:]
    seeds = [r["seed"] for r in runs]

    # ---- plots ----
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for lang in targets:
        per_seed = [r["similarity"][lang] for r in runs]
        layers = range(len(per_seed[0]))
        ax.plot(list(layers), [statistics.fmean(s[i] for s in per_seed) for i in layers], marker="o", label=lang)
    zone = runs[0]["zone_layers"]
    for z in zone:
        ax.axvspan(z - 0.4, z + 0.4, color="0.9", zorder=0)
    ax.set_xlabel("MoE layer (shaded: alignment zone)")
    ax.set_ylabel("cosine(routing en, routing X)")
    ax.set_title("Cross-lingual routing similarity on parallel task prompts")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(img, "ramoe_similarity.png"), dpi=120)
    plt.close(fig)

    slots = runs[0]["slots"]
    delta = runs[0]["delta"]
    width = max(len(d) for d in delta)
    grid = [[d[k] if k < len(d) else float("nan") for k in range(width)] for d in delta]
    fig, ax = plt.subplots(figsize=(5, 0.35 * len(slots) + 1.2))
    lim = max(abs(x) for row in grid for x in row if x == x) or 1.0
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(slots)), [f"layer {s['layer']} {s['name']}" for s in slots], fontsize=7)
    ax.set_xticks(range(width), [str(k) for k in range(width)], fontsize=7)
    for s, chosen in enumerate(runs[0]["task_experts"]):
        for k in chosen:
            ax.text(k, s, "*", ha="center", va="center", fontsize=10)
    ax.set_xlabel("expert (* = task expert)")
    ax.set_title(f"Δ selection frequency, task − general (seed {seeds[0]})", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(img, "ramoe_task_experts.png"), dpi=120)
    plt.close(fig)

    xs, ys, labels = [], [], []
    for r in runs:
        for lang in targets:
            c = r["categories"][lang]
            n = c["cc"] + c["ci"] + c["ic"] + c["ii"]
            xs.append(c["ci"] / n if n else 0.0)
            ys.append(100.0 * (r["methods"]["ramoe"][lang] - r["methods"]["base"][lang]))
            labels.append(lang)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(xs, ys)
    for x, y, lab in zip(xs, ys, labels):
        ax.annotate(lab, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    pred = res.get("predictor")
    if pred:
        lo, hi = min(xs), max(xs)
        ax.plot([lo, hi], [100 * (pred["intercept"] + pred["slope"] * lo), 100 * (pred["intercept"] + pred["slope"] * hi)],
                color="C1", label=f"fit, R² = {pred['r2']:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("ci proportion of the train items (base model)")
    ax.set_ylabel("RA-MoE gain over base (accuracy points)")
    fig.tight_layout()
    fig.savefig(os.path.join(img, "ramoe_predictor.png"), dpi=120)
    plt.close(fig)

    # ---- the section ----
    o = res["options"]
    md = [BEGIN, "", "# RA-MoE on the ISO-code task", ""]
    md.append(f"Produced by `bash scripts/ramoe.sh` (`examples/ramoe`, [ramoe.md](ramoe.md)); this section and its "
              f"plots are written by `scripts/ramoe_results.py` and replaced on every run. Model: `{res['model']}` "
              f"(the Mix-MoE translation model of the run, six target languages). Task: ISO 3166 country name → "
              f"alpha-2 code ([ramoe-task.md](ramoe-task.md)); {res['items']['train']} train items, "
              f"{res['items']['test']} test items, exact match, greedy decoding. Seeds: {', '.join(map(str, seeds))}; "
              f"every number is the mean ± the standard deviation over them.")
    md.append("")
    md.append(f"Budget: English task fine-tuning {o['steps_en']} steps, then each method {o['steps']} steps on the same "
              f"train items of every language"
              + (", plus the English questions of the other items as rehearsal" if o.get('rehearsal') else
                 " (no rehearsal: the English side of the test items may be forgotten)")
              + f" (batches of {o['token_budget']} tokens, peak learning rate {o['lr']}); "
              f"RA-MoE λ = {o['lambda']}, β = {o['beta']}; task experts: top-{o['top_m']} per router slot of the zone "
              f"with Δ > 0; soft steering λ = {o['steer_lambda']}.")
    md.append("")
    md.append("## Test accuracy (%)")
    md.append("")
    md.append("| method | " + " | ".join(langs) + " | mean over targets |")
    md.append("|---|" + "---|" * (len(langs) + 1))
    for key, name in METHODS:
        cells = []
        for lang in langs:
            m, sd = mean_sd([100.0 * r["methods"][key][lang] for r in runs])
            cells.append(f"{m:.1f} ± {sd:.1f}")
        tm, tsd = mean_sd([statistics.fmean(100.0 * r["methods"][key][l] for l in targets) for r in runs])
        md.append(f"| {name} | " + " | ".join(cells) + f" | {tm:.1f} ± {tsd:.1f} |")
    md.append("")
    md.append("## Categories of the train items (base model's answers)")
    md.append("")
    md.append("| language | cc | ci | ic | ii | ci share |")
    md.append("|---|---:|---:|---:|---:|---:|")
    for lang in targets:
        vals = {k: statistics.fmean(r["categories"][lang][k] for r in runs) for k in ("cc", "ci", "ic", "ii")}
        n = sum(vals.values())
        md.append(f"| {lang} | {vals['cc']:.1f} | {vals['ci']:.1f} | {vals['ic']:.1f} | {vals['ii']:.1f} | "
                  f"{(vals['ci'] / n if n else 0):.3f} |")
    md.append("")
    md.append("(means over the seeds: each seed has its own English fine-tuning, so its own base)")
    md.append("")
    md.append("## Gap predictor")
    md.append("")
    if pred:
        md.append(f"RA-MoE gain over the base against the ci proportion, one point per seed and language "
                  f"({pred['points']} points): gain = {100 * pred['intercept']:.2f} "
                  f"{'−' if pred['slope'] < 0 else '+'} {abs(100 * pred['slope']):.2f} · ci "
                  f"(accuracy points), R² = {pred['r2']:.3f}.")
    else:
        md.append("No fit: every point has the same ci proportion.")
    md.append("")
    md.append("![gap predictor](img/ramoe_predictor.png)")
    md.append("")
    md.append("## Routing")
    md.append("")
    md.append(f"Alignment zone: MoE layers {', '.join(map(str, zone))} (the middle half). Similarity per layer:")
    md.append("")
    md.append("![routing similarity](img/ramoe_similarity.png)")
    md.append("")
    md.append("Task experts (Δ of selection frequency on English task prompts against general English text):")
    md.append("")
    md.append("![task experts](img/ramoe_task_experts.png)")
    md.append("")
    md.append(END)
    section = "\n".join(md)

    path = os.path.join(docs, "results.md")
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    b, e = text.find(BEGIN), text.find(END)
    if b >= 0 and e > b:
        text = text[:b] + section + text[e + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote the RA-MoE section of {path} and plots in {img}")


if __name__ == "__main__":
    main()
