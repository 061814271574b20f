"""
The paper's comparison in a toy world, on a laptop: SIT vs the softmax over all seen classes, and which tower to
tune, measured on a CLIP that has real zero-shot ability to keep or lose (the world: tests/toy_world.py).

    python tests/toy_study.py            # 3 seeds, every configuration: about 2.5 minutes on 2 CPU cores
    python tests/toy_study.py --quick    # 1 seed, LoRA on the image and text towers only: about 30 s

The first run also pretrains the toy CLIP, about 2.5 minutes of one CPU core (measured 2026-11-29).

It writes the world's image folders and pretrains the toy CLIP (both reused when already made with the same
settings), then runs only the project's own command lines: `train_online.py --dataset imagefolder` on the Si-Blurry
stream of the stream classes, and `evaluate.py zero-shot --datasets imagefolder` on the held-out classes before and
after tuning. It prints a markdown table of A_auc, A_last, F_last and held-out zero-shot top-1 (mean ± std over
seeds) and writes ROOT/toy_study.png (anytime accuracy, SIT vs all; zero-shot retention per tower). A study, not a
test: nothing here decides who wins.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import toy_world  # noqa: E402

REPO = os.path.dirname(HERE)
# (label, train_online.py flags); each tuned configuration runs with SIT (--visible-classes batch) and with all.
TUNED = [("LoRA image", ["--peft", "lora", "--encoder", "image"]),
         ("LoRA text", ["--peft", "lora", "--encoder", "text"]),
         ("LoRA both", ["--peft", "lora", "--encoder", "both"]),
         ("adapter both", ["--peft", "adapter", "--encoder", "both"])]
# Small enough that a run takes seconds on a CPU: 600 stream images in 3 tasks, batches of 16, 113 steps; hence a
# learning rate 6x the released one (at 1e-3 the tuned runs barely leave zero-shot CLIP's anytime accuracy).
STREAM = ["--n-tasks", "3", "--batch-size", "16", "--eval-period", "60", "--lr", "3e-3",
          "--device", "cpu", "--workers", "0", "--quiet"]


def run(command, log):
    """Run a project command line from the repository root; its output goes to `log`, a failure stops the study.
    One thread each: the toy model's matrices are too small to gain from more, and --jobs runs go side by side."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable] + command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"failed ({done.returncode}): python {' '.join(command)}\n{open(log).read()[-2000:]}")


def zero_shot(where, heldout, weights=None, model=None):
    """Held-out zero-shot top-1 of a tuned run (peft.pt) or of the plain model, via evaluate.py zero-shot."""
    source = ["--peft-weights", weights] if weights else ["--model", model, "--act", "quickgelu"]
    os.makedirs(where, exist_ok=True)
    run(["evaluate.py", "zero-shot", *source, "--datasets", "imagefolder", "--data-root", heldout,
         "--device", "cpu", "--workers", "0", "--out", where], os.path.join(where, "zero_shot.log"))
    return json.load(open(os.path.join(where, "zero_shot.json")))["accuracy"]["imagefolder"]


def train(out, model, data, flags, seed):
    """One online run through train_online.py; returns its results.json."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    run(["train_online.py", "--dataset", "imagefolder", "--data-root", data, "--model", model, "--act", "quickgelu",
         *flags, *STREAM, "--seed", str(seed), "--out", out], os.path.join(out, "train.log"))
    return json.load(open(os.path.join(out, "results.json")))


def mean_std(values):
    """'52.1 ± 3.4' in percent (no ± for one value)."""
    m = 100 * statistics.mean(values)
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def table(rows, before):
    """Markdown table: one row per configuration, mean ± std over seeds."""
    lines = ["| configuration | A_auc | A_last | F_last | held-out zero-shot |", "|---|---|---|---|---|"]
    for label, runs in rows.items():
        cells = [mean_std([r[k] for r in runs]) for k in ("A_auc", "A_last", "F_last")]
        zs = mean_std([r["zero_shot"] for r in runs]) if runs[0]["zero_shot"] is not None else f"{100 * before:.1f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {zs} |")
    return "\n".join(lines)


def plot(rows, before, path):
    """Anytime accuracy (mean over seeds) of SIT vs all per configuration; held-out zero-shot after, per tower."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    colours = dict(zip([label for label, _ in TUNED], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for label, runs in rows.items():
        samples = [a["samples"] for a in runs[0]["anytime"]]
        acc = [100 * statistics.mean(r["anytime"][i]["acc"] for r in runs) for i in range(len(samples))]
        base, _, visible = label.partition(", ")
        style = dict(color="black", linestyle=":") if base == "zero-shot CLIP" else dict(
            color=colours[base], linestyle="-" if visible == "SIT" else "--")
        left.plot(samples, acc, label=label, **style)
    left.set(xlabel="stream samples seen", ylabel="anytime accuracy on seen classes (%)",
             title="anytime accuracy: SIT (solid) vs all seen classes (dashed)")
    left.legend(fontsize=7)
    tuned = [label for label, _ in TUNED if f"{label}, SIT" in rows]
    for k, visible in enumerate(("SIT", "all")):
        values = [[100 * r["zero_shot"] for r in rows[f"{label}, {visible}"]] for label in tuned]
        right.bar([i + 0.4 * k for i in range(len(tuned))], [statistics.mean(v) for v in values], width=0.4,
                  yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], label=visible)
    right.axhline(100 * before, color="black", linestyle=":", label="before tuning")
    right.set_xticks([i + 0.2 for i in range(len(tuned))], tuned)
    right.set(ylabel="held-out zero-shot top-1 (%)", title="zero-shot retention on the held-out classes")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.path.join(REPO, "runs", "toy"), help="world, model and runs go here")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 seed, LoRA on the image and text towers only")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    args = p.parse_args()
    args.root = os.path.abspath(args.root)  # the commands run from the repository root
    seeds = range(1, 2 if args.quick else args.seeds + 1)
    tuned = TUNED[:2] if args.quick else TUNED
    start = time.time()
    world = toy_world.write_folders(os.path.join(args.root, "world"))
    torch.set_num_threads(1)  # pretraining's float sums in one order: the same weights on every run
    model = toy_world.pretrained(toy_world.PretrainConfig(), os.path.join(args.root, "models"))
    stream_data, heldout = os.path.join(world, "stream"), os.path.join(world, "heldout")
    runs = os.path.join(args.root, "runs")
    os.makedirs(runs, exist_ok=True)
    try:
        before = zero_shot(os.path.join(runs, "zero-shot"), heldout, model=model)
    except RuntimeError as e:
        sys.exit(str(e))
    print(f"toy CLIP {model}: held-out zero-shot top-1 {100 * before:.1f}% "
          f"(chance {100 / len(toy_world.classes('heldout')):.1f}%)")
    configs = [("zero-shot CLIP", ["--peft", "none"])]
    configs += [(f"{label}, {name}", flags + ["--visible-classes", visible])
                for label, flags in tuned for name, visible in (("SIT", "batch"), ("all", "all"))]

    def one(label, flags, seed):
        out = os.path.join(runs, label.replace(", ", "-").replace(" ", "-") + f"-seed{seed}")
        r = train(out, model, stream_data, flags, seed)
        r["zero_shot"] = None if "none" in flags else zero_shot(out, heldout, weights=os.path.join(out, "peft.pt"))
        zs = "-" if r["zero_shot"] is None else f"{100 * r['zero_shot']:.1f}"
        print(f"{label:24s} seed {seed}: A_auc {100 * r['A_auc']:5.1f}  A_last {100 * r['A_last']:5.1f}  "
              f"F_last {100 * r['F_last']:5.1f}  zero-shot {zs}  ({time.time() - start:.0f} s)", flush=True)
        return r

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {label: [pool.submit(one, label, flags, seed) for seed in seeds] for label, flags in configs}
        try:
            rows = {label: [f.result() for f in fs] for label, fs in futures.items()}
        except RuntimeError as e:  # a failed command: its line and the end of its log
            pool.shutdown(cancel_futures=True)
            sys.exit(str(e))
    print()
    print(table(rows, before))
    plot(rows, before, os.path.join(args.root, "toy_study.png"))
    print(f"\n{len(seeds)} seed(s), {time.time() - start:.0f} s; plot: {os.path.join(args.root, 'toy_study.png')}")


if __name__ == "__main__":
    main()
