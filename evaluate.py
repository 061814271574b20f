"""
The paper's measures: the lifelong metrics A_auc, A_avg, A_last and F_last; the anytime evaluation
(top-1 on the seen classes' test images, among the seen classes); zero-shot transfer to other
datasets. Then the analyses of run folders (tables, the grid, plots; `python evaluate.py --help`).
Accuracies are fractions in code and files, % in printed tables.
"""

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import adapter
import clip_model
import lora
import stream


# ---- 1. lifelong metrics (released formulas; inputs and outputs are fractions) ----

METRICS = ("A_auc", "A_avg", "A_last", "F_last")


def _mean(values):
    return sum(values) / len(values) if values else None


def a_auc(anytime_accs):
    """A_auc: the mean of the anytime accuracies (the released code's plain mean, not an area)."""
    return _mean(anytime_accs)


def a_avg(task_accs):
    """A_avg: mean of the task-end accuracies."""
    return _mean(task_accs)


def a_last(task_accs):
    """A_last: accuracy at the end of the last task."""
    return task_accs[-1] if task_accs else None


def f_last(class_acc):
    """F_last: mean of (best task-end accuracy before the last task - last accuracy) over classes
    whose best earlier accuracy is above 0. `class_acc[t][c]` is None while c is unseen."""
    if len(class_acc) < 2:
        return None  # nothing to forget before the first task end
    *earlier, last = class_acc
    drops = []
    for c, last_acc in enumerate(last):
        before = [row[c] for row in earlier if row[c] is not None]
        if not before or max(before) <= 0:
            continue  # the released code's filter: unseen (0 there) or never learned
        drops.append(max(before) - last_acc)
    return _mean(drops)  # None when no class qualifies (the released code would give NaN)


def lifelong_metrics(anytime_accs, task_accs, class_acc):
    """The four numbers the paper reports (fractions, None if undefined)."""
    values = (a_auc(anytime_accs), a_avg(task_accs), a_last(task_accs), f_last(class_acc))
    return dict(zip(METRICS, values))


# ---- 2. accuracy on the seen classes (anytime and task-end evaluation) ----


def top1_on_seen(image_features, labels, text_features, seen_classes):
    """(top-1 accuracy, {class: accuracy}) on the test images of the seen classes, among the seen
    classes only. Normalized features: image (N, D), text (S, D), row j for seen_classes[j]."""
    seen = torch.as_tensor(seen_classes, device=image_features.device)  # (S,)
    is_class = labels.to(seen.device)[:, None] == seen[None, :]  # (N, S); all False if unseen
    logits = image_features.float() @ text_features.float().t()  # (N, S)
    predicted = logits.argmax(dim=1)  # (N,) positions in seen
    hit = is_class & F.one_hot(predicted, len(seen)).bool()
    total, correct = torch.stack([is_class.sum(0), hit.sum(0)]).tolist()  # one transfer to the host
    if sum(total) == 0:
        raise ValueError("no test images of the seen classes to evaluate on")
    per_class = {c: k / n for c, n, k in zip(seen.tolist(), total, correct) if n > 0}
    return sum(correct) / sum(total), per_class


@torch.inference_mode()
def evaluate_seen(test, text_features_of, seen, amp=contextlib.nullcontext):
    """The anytime (and task-end) evaluation: top1_on_seen on the seen classes' test images
    (test: train_online.TestImages)."""
    test.model.eval()
    indices = stream.seen_test_indices(test.labels, seen)
    with amp():
        g = text_features_of(seen)
        f = test.features_of(indices)
    return top1_on_seen(f, test.labels[indices], g, seen.tolist())


# ---- 3. zero-shot transfer (the paper's check on five other datasets) ----


@torch.inference_mode()
def zero_shot_transfer(model, datasets, data_root, prompt, device, batch_size=256, workers=2,
                       mean=None, std=None, resize="centre", protocol="ours", precision="auto"):
    """The paper's zero-shot transfer check: {dataset: top-1 among all its classes}. Protocol "ours"
    uses `resize`, `mean`/`std` (default: the model's)."""
    loaded = fetch_zero_shot(datasets, data_root, protocol)
    clip_model.get_tokenizer(model.config.vocab_size)  # the vocabulary too, before any work
    if protocol == "released":  # squashed, with ImageNet's statistics
        mean, std = stream.DATASET_STATS["imagenet-r"]
        resize = "squash"
    mean = mean or model.config.image_mean
    std = std or model.config.image_std
    image_size = model.visual.image_size
    device = torch.device(device)
    was_training = model.training
    model.eval()
    accs = {}
    try:
        with clip_model.autocast(device, precision)():
            for name, (ds, indices, ranked) in loaded.items():
                classes = torch.tensor(list(ranked), device=device)  # (C,) the labels ranked
                text = clip_model.class_text_features(model, list(ranked.values()), prompt)  # (C, D)
                text = text.float()
                correct = torch.zeros((), dtype=torch.long, device=device)
                batches = stream.eval_batches(ds, indices, batch_size, workers, image_size, resize)
                for images, labels in tqdm(batches, desc=name, leave=False):
                    images = images.to(device, non_blocking=True)
                    images = stream.eval_transform(images, image_size, resize, mean, std)
                    image = F.normalize(model.encode_image(images).float(), dim=-1)  # (B, D)
                    predicted = classes[(image @ text.t()).argmax(dim=1)]  # (B,) labels
                    correct += (predicted == labels.to(device)).sum()
                accs[name] = correct.item() / len(indices)
    finally:
        model.train(was_training)
    return accs


# ---- machinery: zero-shot datasets, files, analyses, command line (not the method) ----

ZERO_SHOT_DATASETS = ("food101", "caltech101", "eurosat", "flowers102", "oxford_pets")
ZERO_SHOT_CHOICES = ZERO_SHOT_DATASETS + ("imagefolder",)
ZERO_SHOT_PROTOCOLS = ("ours", "released")
# Where torchvision downloads from, and where under DATA_ROOT it finds a copy put there by hand.
ZERO_SHOT_SOURCES = {
    "food101": ("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "food-101.tar.gz"),
    "caltech101": ("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                   "caltech101/caltech-101.zip"),
    "eurosat": ("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip", "eurosat/EuroSAT.zip"),
    "flowers102": ("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
                   "{102flowers.tgz,imagelabels.mat,setid.mat}", "flowers-102/ (all three files)"),
    "oxford_pets": ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/"
                    "{images.tar.gz,annotations.tar.gz}", "oxford-iiit-pet/ (both archives)"),
}
# CoOp's split files (folder, file, part read): the released protocol reads them; torchvision lacks them.
COOP_SPLITS = {"oxford_pets": ("oxford-iiit-pet", "split_zhou_OxfordPets.json", "val"),
               "flowers102": ("flowers-102", "split_zhou_OxfordFlowers.json", "test")}

# CLIP's prompt names (openai/CLIP data/prompts.md) where torchvision's are not readable; other
# Caltech101 names only need "_" -> " ".
CALTECH101_RENAMES = {
    "Faces": "off-center face", "Faces_easy": "centered face", "Leopards": "leopard",
    "Motorbikes": "motorbike", "airplanes": "airplane", "car_side": "side of a car",
    "cougar_body": "body of a cougar cat", "cougar_face": "face of a cougar cat",
    "crocodile_head": "head of a crocodile", "flamingo_head": "head of a flamingo",
    "snoopy": "snoopy (cartoon beagle)", "yin_yang": "yin and yang symbol"}
EUROSAT_NAMES = {
    "AnnualCrop": "annual crop land", "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings", "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land", "Residential": "residential buildings or homes or apartments",
    "River": "river", "SeaLake": "lake or sea"}
# Flowers102: torchvision's names, except where CLIP's prompt names differ.
FLOWERS102_RENAMES = {"globe-flower": "globe flower", "pink-yellow dahlia?": "pink and yellow dahlia",
                      "ball moss": "air plant"}


def check_zero_shot_names(datasets, protocol="ours"):
    unknown = [d for d in datasets if d not in ZERO_SHOT_CHOICES]
    if unknown or not datasets:
        raise stream.DataError(f"unknown zero-shot dataset(s) {unknown or datasets}; expected a "
                               f"comma-separated list from {', '.join(ZERO_SHOT_CHOICES)}")
    if protocol not in ZERO_SHOT_PROTOCOLS:
        raise stream.DataError(f"unknown zero-shot protocol {protocol!r}; "
                               f"expected {' or '.join(ZERO_SHOT_PROTOCOLS)}")


def caltech101(root):
    """Caltech101 as torchvision lists it, its images read here (torchvision's reader needs scipy):
    readable `classes`, the folder names as `raw_classes`."""
    listed = torchvision.datasets.Caltech101(root, download=True)
    folder = os.path.join(listed.root, "101_ObjectCategories")
    paths = [os.path.join(folder, listed.categories[y], f"image_{i:04d}.jpg")
             for i, y in zip(listed.index, listed.y)]
    classes = [CALTECH101_RENAMES.get(c, c.replace("_", " ")) for c in listed.categories]
    return stream.ImageFiles(paths, listed.y, classes, listed.categories)


def download_zero_shot(name, data_root, released):
    """(dataset, class names: the released code's or readable) of a torchvision zero-shot set."""
    tv = torchvision.datasets
    url, put_at = ZERO_SHOT_SOURCES[name]
    try:
        with clip_model.undo_new_folders(os.path.dirname(os.path.join(data_root, put_at))):
            if name == "food101":
                ds = tv.Food101(data_root, split="test", download=True)
                return ds, ds.classes if released else [c.replace("_", " ") for c in ds.classes]
            if name == "caltech101":  # no test split: all images
                ds = caltech101(data_root)
                return ds, ds.raw_classes if released else ds.classes
            if name == "eurosat":  # no split either: all images
                ds = tv.EuroSAT(data_root, download=True)
                return ds, ds.classes if released else [EUROSAT_NAMES[c] for c in ds.classes]
            if name == "flowers102":  # released: CoOp's names
                ds = tv.Flowers102(data_root, split="test", download=True)
                return ds, [] if released else [FLOWERS102_RENAMES.get(c, c) for c in ds.classes]
            # Oxford Pets: ours, the test split; released, the trainval images CoOp's split lists
            split = "trainval" if released else "test"
            ds = tv.OxfordIIITPet(data_root, split, target_types="category", download=True)
            return ds, ds.classes  # readable ("American Pit Bull Terrier"); released: CoOp's
    except ImportError as e:  # torchvision reads Flowers102's labels with scipy (not required)
        raise stream.DataError(f"{name}: torchvision needs {e.name} to read it: "
                               f"pip install {e.name}") from None
    except OSError as e:  # no network (a URLError is an OSError), or a file that cannot be written
        raise clip_model.DownloadError(name, url, e, os.path.join(data_root, put_at)) from None
    except RuntimeError as e:  # torchvision: corrupt or incomplete files
        raise stream.DataError(f"{name}: could not load it under {data_root}: {e}") from None


def zero_shot_dataset(name, data_root, protocol="ours"):
    """(dataset, indices of its evaluation images, {label: name} of the classes ranked) as
    `protocol` evaluates it."""
    check_zero_shot_names([name], protocol)
    released = protocol == "released"
    coop = None
    if released and name in COOP_SPLITS:  # before any download: the file a user must fetch by hand
        folder, file, part = COOP_SPLITS[name]
        coop = read_json(os.path.join(data_root, folder, file), "the released zero-shot protocol "
                         "reads it; put CoOp's split file there: "
                         "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md")[part]
    if name == "imagefolder":
        ds = stream.load_dataset("imagefolder", data_root, train=False)  # DATA_ROOT/test/<class>/*
        class_names = ds.raw_classes if released else ds.classes
    else:
        ds, class_names = download_zero_shot(name, data_root, released)
    ranked = dict(enumerate(class_names))
    if coop is not None:  # entries [image file, label, class name]
        ranked = {label: class_name for _, label, class_name in coop}
    indices = list(range(len(ds)))
    if released and name == "caltech101":  # the released code drops Faces_easy; CLIP's keeps it
        del ranked[class_names.index("Faces_easy")]
        indices = [i for i, c in enumerate(ds.targets) if c in ranked]
    if released and name == "oxford_pets":  # the trainval images CoOp's split validates with (~736)
        files = {file for file, _, _ in coop}
        indices = [i for i, path in enumerate(ds._images) if os.path.basename(path) in files]
    require(indices, name, f"no images to evaluate under {data_root}")
    return ds, indices, ranked


def fetch_zero_shot(datasets, data_root, protocol="ours"):
    """{name: zero_shot_dataset(name, ...)}, every name checked first (None: the paper's five)."""
    datasets = datasets or ZERO_SHOT_DATASETS
    check_zero_shot_names(datasets, protocol)
    return {name: zero_shot_dataset(name, data_root, protocol) for name in datasets}


def zero_shot_eval(model, datasets, data_root, prompt, device, out_dir, source, peft_weights=None,
                   protocol="ours", **options):
    """zero_shot_transfer, printed and written to OUT_DIR/zero_shot.json (source: the checkpoint);
    returns the file's path."""
    accs = zero_shot_transfer(model, datasets, data_root, prompt, device, protocol=protocol, **options)
    print("| dataset | top-1 (%) |\n|---|---:|")
    for name, acc in accs.items():
        print(f"| {name} | {100 * acc:.2f} |")
    if len(accs) > 1:
        print(f"| mean | {100 * _mean(accs.values()):.2f} |")
    path = os.path.join(out_dir, "zero_shot.json")
    write_json(path, dict(model=source, peft_weights=peft_weights, prompt=prompt, protocol=protocol,
                          accuracy=accs))
    return path


# ---- files: one error line for each problem; peft.pt ----


def require(ok, path, problem):
    """Unless ok, DataError 'PATH: PROBLEM'."""
    if not ok:
        raise stream.DataError(f"{path}: {problem}")


def read_json(path, what):
    """A JSON file; `what` says who writes it."""
    require(os.path.isfile(path), path, f"no such file ({what})")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise stream.DataError(f"{path}: malformed JSON ({e})") from None


def write_json(path, obj):
    stream.write_file(path, json.dumps(obj, indent=1).encode())


def read_peft_file(path):
    """The dict of OUT/peft.pt, checked for what rebuilds the model."""
    keys = ["model", "peft", "encoder", "peft_args", "state_dict", "prompt"]
    require(os.path.isfile(path), path, "no such file (train_online.py writes OUT/peft.pt)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # many types, one meaning; torch's message advises unpickling code: unsafe
        raise stream.DataError(f"{path}: not a torch file of tensors, as peft.pt is") from None
    ok = isinstance(saved, dict) and set(keys) <= saved.keys()
    ok = ok and saved["peft"] in ("lora", "adapter")
    require(ok, path, f"not the dict train_online.py saves in OUT/peft.pt (keys {keys}, "
                      "peft lora or adapter)")
    return saved


# The PEFT of a peft.pt: how to add its tensors to a CLIP, and how to load them.
PEFT_LOADERS = {"lora": (lora.apply_lora, lora.load_lora_state_dict),
                "adapter": (adapter.apply_adapter, adapter.load_adapter_state_dict)}


def load_peft_model(path, device="cpu"):
    """(model, prompt) of a run, rebuilt from OUT/peft.pt (mean/std in model.config)."""
    saved = read_peft_file(path)
    model = clip_model.load(saved["model"], act=saved.get("act"))  # its errors name the path
    if "mean" in saved:
        model.config = replace(model.config, image_mean=tuple(saved["mean"]), image_std=tuple(saved["std"]))
    apply, load_weights = PEFT_LOADERS[saved["peft"]]
    try:
        apply(model, encoder=saved["encoder"], **saved["peft_args"])
        load_weights(model, saved["state_dict"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise stream.DataError(f"{path}: its {saved['peft']} weights do not fit {saved['model']} "
                               f"({type(e).__name__}: {e})") from None
    return model.to(device).eval(), saved["prompt"]


# ---- analyses of run folders: seed tables, the grid, the gradient timeline, plots ----

# Settings that should agree within a table row; the table warns when they do not.
MUST_AGREE = ("model", "act", "n_tasks", "n", "m", "batch_size", "online_iter", "lr", "eval_period",
              "memory_size", "recipe", "lora_init", "double_softmax", "augment_per", "normalize",
              "test_resize", "class_names", "image_fit", "precision", "eval_split", "zero_shot_protocol")
REPOSITORY = os.path.dirname(os.path.abspath(__file__))  # where `python train_online.py` runs from


def read_results(run_dir):
    """OUT/results.json of one run, checked."""
    path = os.path.join(run_dir, "results.json")
    results = read_json(path, "train_online.py writes it in every run folder")
    needed = ("config", "status", "seen_classes", "anytime", "task_end_samples", "class_acc", *METRICS)
    missing = [k for k in needed if not isinstance(results, dict) or k not in results]
    require(not missing, path, f"missing key(s) {missing}")
    return results


def read_runs(paths, skip_malformed=False):
    """{run folder: read_results(run folder)} for the run folders at or below `paths`."""
    runs = {}
    for path in paths:
        found = sorted(root for root, _, files in os.walk(path) if "results.json" in files)
        for run in found or [path]:  # none: read_results names the missing file
            try:
                runs[run] = read_results(run)
            except stream.DataError as e:
                if not (skip_malformed and found):
                    raise
                print(f"warning: skipping {e}", file=sys.stderr)
    return runs


def mean_std(values):
    """'mean ± std' (%) of the values that are not None: sample std (ddof=1), 0 for one seed;
    '(n=k)': only k runs define it."""
    present = [100 * v for v in values if v is not None]
    if not present:
        return "–"
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    cell = f"{statistics.fmean(present):.2f} ± {std:.2f}"
    if len(present) < len(values):
        cell += f" (n={len(present)})"
    return cell


def seed_table(results):
    """(Markdown table, warnings): mean ± std over seeds (%) of the four metrics, a row per
    configuration; warnings for mixed settings or repeated seeds."""
    groups = {}
    for r in results:
        c = r["config"]
        tower = c.get("encoder")
        visible = c.get("visible_classes")
        if c.get("peft") == "none":  # zero-shot CLIP trains no tower and has no loss
            tower = visible = "–"
        key = (c.get("dataset"), c.get("peft"), tower, visible, c.get("scenario"))
        groups.setdefault(key, []).append(r)
    lines = ["| dataset | PEFT | tower | visible | scenario | seeds | A_auc | A_avg | A_last | F_last |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    warnings = []
    for key, runs in groups.items():
        cells = [*key, len(runs)] + [mean_std([r[m] for r in runs]) for m in METRICS]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
        name = "/".join(map(str, key))
        mixed = [k for k in MUST_AGREE if len({json.dumps(r["config"].get(k)) for r in runs}) > 1]
        seeds = sorted(r["config"].get("seed") for r in runs)
        if mixed:
            warnings.append(f"warning: row {name} mixes runs with different {', '.join(mixed)}")
        if len(set(seeds)) < len(seeds):
            warnings.append(f"warning: row {name} has repeated seeds {seeds}")
    return "\n".join(lines), warnings


def grid_runs(dataset, data_root=None, seeds=(1, 2, 3, 4, 5), zero_shot_eval=False, recipe="ours",
              runs_root="runs"):
    """(out folder, train_online.py command) for every seed of {LoRA, adapter} x {image, text, both}
    x {batch (SIT), all} and zero-shot CLIP."""
    configs = [(p, e, v) for p in ("lora", "adapter") for e in lora.ENCODERS for v in ("batch", "all")]
    folder = os.path.join(runs_root, dataset)
    common = ["python", "train_online.py", "--dataset", dataset]
    if data_root:
        common += ["--data-root", data_root]
    if recipe != "ours":
        folder += f"-{recipe}"
        common += ["--recipe", recipe]
    if zero_shot_eval:
        common += ["--zero-shot-eval"]
    runs = []
    for peft, encoder, visible in configs + [("none", None, None)]:
        name = "zero-shot"
        flags = ["--peft", peft]
        if peft != "none":
            name = f"{peft}-{encoder}-{visible}"
            flags += ["--encoder", encoder, "--visible-classes", visible]
        for seed in seeds:
            out = os.path.join(folder, name, f"seed{seed}")
            runs.append((out, shlex.join(common + flags + ["--seed", str(seed), "--out", out])))
    return runs


def is_finished(run_dir):
    """Whether RUN_DIR (from the repository) holds a finished results.json."""
    try:
        with open(os.path.join(REPOSITORY, run_dir, "results.json")) as f:
            return json.load(f).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False  # missing, half-written or malformed: run it (again)


def slurm_script(commands, job_name, log_dir, time="02:00:00", cpus=8, partition=None):
    """A SLURM batch script, needing no other file: array task k runs commands[k] on one GPU."""
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job_name}",
             f"#SBATCH --array=0-{len(commands) - 1}",
             "#SBATCH --gres=gpu:1",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={cpus}",
             f"#SBATCH --time={time}",
             f"#SBATCH --output={os.path.join(log_dir, '%x-%A_%a.log')}"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [f"# {len(commands)} runs of `python evaluate.py grid`. Submit with: sbatch THIS_FILE",
              "# After failures or a time limit: grid --skip-finished prints what is left.",
              "set -euo pipefail", f"cd {shlex.quote(REPOSITORY)}",
              'case "${SLURM_ARRAY_TASK_ID:?run this script with sbatch}" in']
    lines += [f"  {k}) {command} ;;" for k, command in enumerate(commands)]
    lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac"]
    return "\n".join(lines) + "\n"


def read_grad(path):
    """The records of OUT/grad.jsonl (one per gradient step), checked."""
    require(os.path.isfile(path), path, "no such file (train_online.py --grad-analysis writes it)")
    lists = ("classes", "in_batch", "pos", "neg")
    records = []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise stream.DataError(f"{path}:{i}: malformed JSON ({e})") from None
            ok = isinstance(r, dict) and {"step", "task", *lists} <= r.keys()
            ok = ok and len({len(r[k]) for k in lists}) == 1
            require(ok, f"{path}:{i}", f"expected keys step, task and {', '.join(lists)} "
                                       "(lists of one length)")
            records.append(r)
    require(records, path, "no gradient steps recorded")
    return records


def gradient_summary(records):
    """Figure 2 in numbers: mean norms of the gradient's positive and negative parts on the text
    features of visible classes in the batch and absent from it."""
    entries = [e for r in records for e in zip(r["in_batch"], r["pos"], r["neg"])]  # (present, pos, neg)
    parts = {"present": [e for e in entries if e[0]], "absent": [e for e in entries if not e[0]]}
    return {key: {"entries": len(part), "pos": _mean([e[1] for e in part]),
                  "neg": _mean([e[2] for e in part])} for key, part in parts.items()}


def matplotlib_figure():
    """matplotlib's Figure class (no pyplot state, no backend switch)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise stream.DataError("plotting needs matplotlib (optional): pip install matplotlib") from None
    return Figure


def save_png(fig, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def run_label(results):
    """'lora image batch seed 1', 'zero-shot seed 1'."""
    c = results["config"]
    name = f"{c.get('peft')} {c.get('encoder')} {c.get('visible_classes')}"
    if c.get("peft") == "none":
        name = "zero-shot"
    return f"{name} seed {c.get('seed')}"


def class_ticks(ax, classes, names, most=40):
    """Label the class rows of a heatmap with {class: name}, unless too many."""
    shown = classes if names and len(classes) <= most else []
    ax.set_yticks(range(len(shown)), [names[c] for c in shown], fontsize="small")


def plot_grad(records, results, out_png):
    """Gradient timeline (Figure 2): classes x gradient steps, the positive and negative parts of
    dL/dg_c in two panels."""
    visible = dict.fromkeys(c for r in records for c in r["classes"])  # in the loss, in order
    classes = [c for c in dict.fromkeys([*results["seen_classes"], *visible]) if c in visible]
    height = 2 + 2 * max(2.0, 0.04 * len(classes))
    fig = matplotlib_figure()(figsize=(12, height), layout="constrained")
    row = {c: i for i, c in enumerate(classes)}
    pos = [[math.nan] * len(records) for _ in classes]  # (classes, steps)
    neg = [[math.nan] * len(records) for _ in classes]
    for j, r in enumerate(records):
        for c, p, n in zip(r["classes"], r["pos"], r["neg"]):
            pos[row[c]][j] = p
            neg[row[c]][j] = n
    task_lists = {k: results.get(f"{k}_classes", []) for k in ("disjoint", "blurry")}
    kind = {c: k for k, tasks in task_lists.items() for task in tasks for c in task}  # class -> k
    class_names = enumerate(results.get("class_names", []))
    names = {c: f"{name} ({kind.get(c, '?')})" for c, name in class_names}
    tasks = [r["task"] for r in records]
    boundaries = [j - 0.5 for j in range(1, len(tasks)) if tasks[j] != tasks[j - 1]]
    panels = [(pos, "positive part (samples of c)"), (neg, "negative part (other samples)")]
    for k, (matrix, part) in enumerate(panels):
        ax = fig.add_subplot(2, 1, k + 1)
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.vlines(boundaries, -0.5, len(classes) - 0.5, color="red", lw=0.8, ls="--")
        class_ticks(ax, classes, names)
        ax.set_title(f"|dL/dg_c|, {part}")
        fig.colorbar(image, ax=ax, label="L2 norm")
    ax.set_xlabel("gradient step (dashed: task boundary; empty cell: class not in the loss)")
    fig.suptitle(f"Gradient on the text features, classes in order of first appearance: "
                 f"{run_label(results)}")
    save_png(fig, out_png)


def plot_runs(runs, out_png):
    """Anytime accuracy of each run (task ends marked) and its per-class accuracy at each task end."""
    n_cols = min(len(runs), 4)
    n_rows = math.ceil(len(runs) / n_cols)
    fig = matplotlib_figure()(figsize=(4 * n_cols + 2, 4 + 3.5 * n_rows), layout="constrained")
    grid = fig.add_gridspec(1 + n_rows, n_cols)
    curves = fig.add_subplot(grid[0, :])
    image = None
    for i, r in enumerate(runs):
        samples = [a["samples"] for a in r["anytime"]]
        accs = [100 * a["acc"] for a in r["anytime"]]
        (line,) = curves.plot(samples, accs, marker=".", label=run_label(r))
        for s in r["task_end_samples"]:
            curves.axvline(s, color=line.get_color(), lw=0.8, ls=":")
        ax = fig.add_subplot(grid[1 + i // n_cols, i % n_cols])
        classes = r["seen_classes"]
        ends = len(r["class_acc"])
        if classes and ends:
            matrix = [[math.nan if row[c] is None else 100 * row[c] for row in r["class_acc"]]
                      for c in classes]  # (classes, task ends)
            image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis",
                              vmin=0, vmax=100)
        ax.set_xticks(range(ends), [f"T{t + 1}" for t in range(ends)])
        class_ticks(ax, classes, dict(enumerate(r.get("class_names", []))))
        xlabel = "task end" if ends else "no task end yet"
        ax.set(xlabel=xlabel, ylabel="classes, in seen order", title=run_label(r))
    curves.set(xlabel="samples seen (dotted: task ends)", ylabel="anytime accuracy on seen classes (%)")
    curves.legend(fontsize="small")
    if image is not None:
        fig.colorbar(image, ax=fig.axes[1:], label="per-class accuracy (%)")
    save_png(fig, out_png)


# ---- command line ----


def cmd_zero_shot(args):
    device = clip_model.resolve_device(args.device)
    if args.peft_weights:
        saved = read_peft_file(args.peft_weights)
        model, prompt = load_peft_model(args.peft_weights, device)  # with the run's mean/std
        out = args.out or os.path.dirname(os.path.abspath(args.peft_weights))
    else:
        saved = dict(model=args.model)
        model = clip_model.load(args.model, device, act=None if args.act == "auto" else args.act)
        prompt = clip_model.PROMPT
        slug = args.model
        if os.path.isfile(args.model):
            slug = os.path.splitext(os.path.basename(args.model))[0]
        out = args.out or os.path.join("runs", "zero-shot", slug.replace("/", "-").replace("@", "-"))
    resize = saved.get("test_resize", "centre")
    resize = {"clip": "centre"}.get(resize, resize)  # "clip": the name before "centre"
    recipe = saved.get("recipe", {})
    protocol = args.protocol or recipe.get("zero_shot_protocol", "ours")  # the run's, unless told
    precision = args.precision or recipe.get("precision", "auto")
    path = zero_shot_eval(model, args.datasets, args.data_root, prompt, device, out, saved["model"],
                          args.peft_weights, protocol, batch_size=args.batch_size, workers=args.workers,
                          resize=resize, precision=precision)
    print(f"wrote {path}")


def cmd_table(args):
    results = []
    for run, r in read_runs(args.run_dirs, skip_malformed=True).items():
        if r["status"] == "finished" or args.unfinished:
            results.append(r)
        else:
            print(f"skipping {run} (status {r['status']}; --unfinished includes it)", file=sys.stderr)
    if not results:
        raise stream.DataError("no finished runs to tabulate (--unfinished includes the others)")
    table, warnings = seed_table(results)
    for warning in warnings:
        print(warning, file=sys.stderr)
    print(table)


def cmd_grid(args):
    runs = grid_runs(args.dataset, args.data_root, zero_shot_eval=args.zero_shot_eval,
                     recipe=args.recipe, runs_root=args.runs_root)
    if args.skip_finished:
        todo = [(out, command) for out, command in runs if not is_finished(out)]
        print(f"skipping {len(runs) - len(todo)} finished run(s); {len(todo)} to run", file=sys.stderr)
        runs = todo
    commands = [command for _, command in runs]
    if not args.slurm:
        print("\n".join(commands))
    elif commands:
        folder = os.path.dirname(os.path.dirname(runs[0][0]))  # runs_root/<dataset>[-released]
        log_dir = os.path.join(REPOSITORY, folder, "slurm-logs")
        os.makedirs(log_dir, exist_ok=True)  # SLURM does not create it: the job logs would be lost
        job_name = f"sit-{os.path.basename(folder)}"
        print(slurm_script(commands, job_name, log_dir, args.time, args.cpus, args.partition), end="")


def cmd_plot(args):
    matplotlib_figure()  # fail before reading anything when it is missing
    runs = read_runs(args.run_dirs)
    out = args.out or "plot.png"
    if not args.out and len(runs) == 1:
        out = os.path.join(*runs, "plot.png")
    plot_runs(list(runs.values()), out)


def cmd_plot_grad(args):
    """gradient_summary as a Markdown table, and the timeline PNG."""
    matplotlib_figure()
    records = read_grad(os.path.join(args.run_dir, "grad.jsonl"))
    print("| visible classes | entries | mean positive part | mean negative part |")
    print("|---|---:|---:|---:|")
    summary = gradient_summary(records).values()
    for label, s in zip(("in the batch", "absent from the batch"), summary):
        cells = ["–" if s[k] is None else f"{s[k]:.4g}" for k in ("pos", "neg")]
        print(f"| {label} | {s['entries']} | {' | '.join(cells)} |")
    out = args.out or os.path.join(args.run_dir, "grad.png")
    plot_grad(records, read_results(args.run_dir), out)


# Shared with train_online.py's command line.


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the defaults, but None (set later) and False; descriptions keep their layout."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is --help's)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpWithDefaults, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def in_range(kind, low, high=math.inf, above=False):
    """An argparse type: a finite int or float (kind) in low..high, or above low (above=True)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high) or (above and value == low):
            bounds = f"> {low}, at most {high:.6g}" if above else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} {bounds}, got {text}")
        return value
    return parse


def zero_shot_list(text):
    """An argparse type: a comma-separated list of zero-shot data sets."""
    datasets = [d.strip() for d in text.split(",") if d.strip()]
    try:
        check_zero_shot_names(datasets)
    except stream.DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return datasets


def build_parser():
    parser = ArgumentParser(description="Evaluate SIT-tuned CLIP: zero-shot transfer, tables, plots.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("zero-shot", help="top-1 accuracy on other datasets -> zero_shot.json")
    arg = p.add_argument
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--peft-weights", help="a run's OUT/peft.pt (rebuilds its tuned model, prompt)")
    weights.add_argument("--model", help=f"plain CLIP: {clip_model.available_models()} or a checkpoint")
    arg("--act", default="auto", choices=("auto",) + clip_model.ACTIVATIONS,
        help="MLP activation of --model: auto = open_clip_config.json beside it, else QuickGELU")
    arg("--datasets", type=zero_shot_list, help=f"from {', '.join(ZERO_SHOT_CHOICES)} (default: the paper's 5)")
    arg("--data-root", default="data", help="torchvision's downloads; imagefolder: ROOT/test/")
    arg("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if any")
    arg("--batch-size", type=in_range(int, 1), default=256, help="test images per batch")
    arg("--workers", type=in_range(int, 0), default=2, help="data-loading processes")
    arg("--protocol", choices=ZERO_SHOT_PROTOCOLS, help="released: the released code's images, names "
        "and preprocessing (default: the run's, else ours)")
    arg("--precision", choices=("auto", "fp32", "bf16"),
        help="auto: bf16 on CUDA (default: the run's)")
    arg("--out", help="folder for zero_shot.json (default: beside --peft-weights, "
        "runs/zero-shot/<model>)")
    p = commands.add_parser("table", help="Markdown table of A_auc, A_avg, A_last, F_last over seeds")
    arg = p.add_argument
    arg("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders above them")
    arg("--unfinished", action="store_true", help="include interrupted or failed runs")
    p = commands.add_parser("grid", help="print the train_online.py commands of the paper's comparison")
    arg = p.add_argument
    arg("--dataset", default="cifar100", choices=stream.DATASETS)
    arg("--data-root", help="passed on to train_online.py")
    arg("--zero-shot-eval", action="store_true", help="add --zero-shot-eval to every command")
    arg("--recipe", default="ours", choices=("ours", "released"), help="passed on to each run")
    arg("--runs-root", default="runs",
        help="runs go to RUNS_ROOT/<dataset>[-released]/<config>/seed<k>")
    arg("--skip-finished", action="store_true", help="leave out runs already finished")
    arg("--slurm", action="store_true", help="print a SLURM job-array script (a GPU per run)")
    arg("--time", default="02:00:00", help="--slurm: the time limit of each run")
    arg("--cpus", type=in_range(int, 1), default=8, help="--slurm: CPU cores per run")
    arg("--partition", help="--slurm: the SLURM partition to submit to")
    p = commands.add_parser("plot", help="PNG of anytime accuracy and per-class accuracy at task ends")
    arg = p.add_argument
    arg("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders above them")
    arg("--out", help="PNG path (default: RUN_DIR/plot.png for one run, else ./plot.png)")
    p = commands.add_parser("plot-grad", help="PNG of the gradient timeline (Figure 2) of a run")
    arg = p.add_argument
    arg("run_dir", metavar="OUT", help="run folder with grad.jsonl and results.json")
    arg("--out", help="PNG path (default: OUT/grad.png)")
    return parser


def main(argv=None):
    """One command; bad input: one error line, exit 2 for a flag, else 1."""
    args = build_parser().parse_args(argv)
    command = {"zero-shot": cmd_zero_shot, "table": cmd_table, "grid": cmd_grid, "plot": cmd_plot,
               "plot-grad": cmd_plot_grad}[args.command]
    try:
        command(args)
    except (ValueError, clip_model.CheckpointError, clip_model.DownloadError) as e:  # DataError too
        print(f"evaluate.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"evaluate.py {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
