#!/usr/bin/env python3
"""Writes docs/results.md and its plots from a comparison work directory (scripts/compare.sh).

    python3 scripts/results.py WORK DOCS

Reads WORK/<variant>/results.json (test-set BLEU/chrF per direction, the monolingual LM loss
before and after stage 2, routing counts per language) and the metrics logs
WORK/<variant>/stage{1,2}/metrics.jsonl, WORK/stage0/metrics.jsonl.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["dense", "moe", "mix-fft", "mix-fft-nostage1", "mix-dct", "mix-random", "mix-fft-frozen-emb"]
WHAT = {
    "dense": "dense LM, full fine-tuning on the parallel data (the interference baseline)",
    "moe": "vanilla MoE: the same experts under one router, no Fourier features, nothing frozen in stage 2",
    "mix-fft": "Mix-MoE: LM + MT groups, FFT-magnitude router features, stage 1 then stage 2 (MT experts, routers, "
               "attention and embeddings train; LM experts and norms frozen)",
    "mix-fft-nostage1": "Mix-MoE without the monolingual stage 1",
    "mix-dct": "Mix-MoE with DCT router features",
    "mix-random": "Mix-MoE with random-projection router features",
    "mix-fft-frozen-emb": "mix-fft with the embeddings frozen in stage 2, as the paper's recipe",
}


def read_jsonl(path):
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a partial last line of a killed run
    return out


RAMOE_BEGIN = "<!-- ramoe:begin -->"
RAMOE_END = "<!-- ramoe:end -->"


def main():
    work, docs = sys.argv[1], sys.argv[2]
    img = os.path.join(docs, "img")
    os.makedirs(img, exist_ok=True)
    runs = {}
    for name in sorted(os.listdir(work)):
        p = os.path.join(work, name, "results.json")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                runs[name] = json.load(f)
    if not runs:
        sys.exit(f"results.py: no {work}/<variant>/results.json")
    names = [n for n in ORDER if n in runs] + sorted(n for n in runs if n not in ORDER)
    dirs = [d["direction"] for d in runs[names[0]]["directions"]]
    sentences = runs[names[0]]["directions"][0]["sentences"]

    # ---- table
    lines = []
    head = "| model | " + " | ".join(f"{d} BLEU / chrF2" for d in dirs) + " | mean BLEU | mean chrF2 | "
    head += "mono loss before → after stage 2 (Δ) |"
    lines += [head, "|" + "---|" * (len(dirs) + 4)]
    first = runs[names[0]]["directions"]
    copy = "| copy the source | " + " | ".join(f"{d['copy_bleu']:.2f} / {d['copy_chrf']:.2f}" for d in first)
    copy += f" | {sum(d['copy_bleu'] for d in first) / len(first):.2f} | {sum(d['copy_chrf'] for d in first) / len(first):.2f} | |"
    lines.append(copy)
    summary = {}
    for n in names:
        r = runs[n]
        ds = r["directions"]
        mb = sum(d["bleu"] for d in ds) / len(ds)
        mc = sum(d["chrf"] for d in ds) / len(ds)
        before, after = r["mono_loss_before_stage2"], r["mono_loss_after_stage2"]
        summary[n] = (mb, mc, after)
        lines.append(
            f"| {n} | " + " | ".join(f"{d['bleu']:.2f} / {d['chrf']:.2f}" for d in ds)
            + f" | {mb:.2f} | {mc:.2f} | {before:.3f} → {after:.3f} ({after - before:+.3f}) |")

    # ---- training curves (and the stage-2 steps the runs made: the last logged step)
    steps2 = 0
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for n in names:
        ev = read_jsonl(os.path.join(work, n, "stage2", "metrics.jsonl"))
        tr = [e for e in ev if e.get("split") == "train"]
        dv = [e for e in ev if e.get("split") == "dev"]
        if tr:
            axes[0].plot([e["step"] for e in tr], [e["ce"] for e in tr], label=n, linewidth=1)
            steps2 = max(steps2, tr[-1]["step"])
        if dv:
            axes[1].plot([e["step"] for e in dv], [e["dev_loss"] for e in dv], marker="o", label=n)
    axes[0].set_title("stage 2: training cross-entropy (label-smoothed)")
    axes[1].set_title("stage 2: dev translation loss")
    for a in axes:
        a.set_xlabel("step")
        a.set_ylabel("nats / target token")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(img, "results_curves.png"), dpi=110)
    plt.close(fig)

    # ---- expert load per layer per language (the first Mix-MoE variant found)
    mix = next((n for n in names if n.startswith("mix-") and runs[n].get("routing")), None)
    routing_note = ""
    if mix:
        rt = runs[mix]["routing"]
        langs = list(rt.keys())
        keys = sorted(rt[langs[0]].keys(), key=lambda k: (int(k.split("/")[0]), k))
        cols, labels = [], []
        for k in keys:
            for e in range(len(rt[langs[0]][k])):
                cols.append((k, e))
                labels.append(f"L{k.split('/')[0]} {k.split('/')[1].replace('router.', '')}{e}")
        mat = []
        for lang in langs:
            row = []
            for k, e in cols:
                c = rt[lang][k]
                total = sum(c) or 1.0
                row.append(c[e] / total)
            mat.append(row)
        fig, ax = plt.subplots(figsize=(max(8, len(cols) * 0.35), 0.5 * len(langs) + 2))
        im = ax.imshow(mat, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(langs)), langs)
        ax.set_xticks(range(len(cols)), labels, rotation=90, fontsize=7)
        ax.set_title(f"{mix}: share of each router's assignments per expert, held-out text per language")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(img, "results_routing.png"), dpi=110)
        plt.close(fig)
        routing_note = (f"![expert load per layer and language](img/results_routing.png)\n\n"
                        f"Expert load of `{mix}` per layer and language: for every router (LM group `lm`, MT group "
                        f"`mt`) of every layer, the share of its assignments that went to each expert, on held-out "
                        f"monolingual text of each language (English included).\n")

    cfg = runs[names[0]].get("config", {}).get("config", {})
    slots = runs[names[0]].get("config", {}).get("extra", {}).get("verbatim_slots", 0)
    verbatim_note = (f" through {slots} verbatim slots with exact slot counts (placeholders, options, numbers, paths "
                     "and identifiers as slot tokens; [translation.md](translation.md#verbatim-slots))"
                     if slots else ", on the raw text (no verbatim slots)")
    best = max(summary, key=lambda n: summary[n][0])
    least = min(summary, key=lambda n: summary[n][2])
    md = []
    md.append("# Results: Mix-MoE against its baselines on the machine's gettext corpus\n")
    md.append("Produced by `bash scripts/compare.sh` (this page and its plots are written by `scripts/results.py`; "
              "rerunning the command replaces them). Every model starts from the same tokenizer and the same stage-0 "
              "dense LM and gets the same budgets: the `demo` preset of `examples/translate` with "
              f"{steps2} stage-2 steps (see [translation.md](translation.md)); the scores are corpus BLEU (13a) and "
              "chrF2 as sacreBLEU computes them, on "
              f"{sentences} sentences evenly spaced over each test set (catalogs of Linux-PAM, apt, shadow, systemd; "
              "[data.md](data.md)), greedy decoding" + verbatim_note + ".\n")
    if cfg:
        md.append(f"Model: d_model {cfg.get('d_model')}, {cfg.get('layers')} layers, {cfg.get('heads')} heads "
                  f"({cfg.get('kv_heads')} KV), dense FFN {cfg.get('d_ff')}, vocabulary {cfg.get('vocab')}; MoE "
                  f"layers with experts per group {cfg.get('moe', {}).get('experts_per_group')}, expert width "
                  f"{cfg.get('moe', {}).get('expert_hidden')}, top-{cfg.get('moe', {}).get('top_k')}.\n")
    md.append("| model | what it is |\n|---|---|")
    for n in names:
        md.append(f"| {n} | {WHAT.get(n, n)} |")
    md.append("")
    md.append("## Test sets\n")
    md += lines
    md.append("")
    md.append("\"mono loss\" is the cross-entropy (nats per token) of the model on held-out monolingual text of all "
              "the languages (the dev catalogs' sentences) just before stage 2 and after it: how much the translation "
              "training damaged the language model, which is what parameter interference means. The copy row "
              "scores the English source itself as the translation.\n")
    md.append(f"Best mean BLEU: `{best}` ({summary[best][0]:.2f}). Lowest monolingual loss after stage 2 (the least "
              f"damaged language model; the Δ of a model without stage 1 starts from its freshly upcycled state): "
              f"`{least}` ({summary[least][2]:.3f} nats).\n")
    md.append("## Training curves\n")
    md.append("![stage 2 training curves](img/results_curves.png)\n")
    if routing_note:
        md.append("## Routing\n")
        md.append(routing_note)
    # The RA-MoE section (scripts/ramoe_results.py) lives between its markers: keep it.
    path = os.path.join(docs, "results.md")
    kept = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        b, e = old.find(RAMOE_BEGIN), old.find(RAMOE_END)
        if b >= 0 and e > b:
            kept = "\n" + old[b:e + len(RAMOE_END)] + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n" + kept)
    print(f"wrote {os.path.join(docs, 'results.md')} and plots in {img}")


if __name__ == "__main__":
    main()
