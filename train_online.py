"""
SIT, the paper's method: CLIP tuned online on a Si-Blurry stream, each batch seen once, its loss a
softmax over C_B, the classes in the batch. The loss, one step and `train` (the Algorithm) come
first; what `train` is handed, a run and the command line after a marked line.

    python train_online.py --smoke                                    # offline: a tiny CLIP learns
    python train_online.py --dataset cifar100                         # SIT-LoRA on both towers
    python train_online.py --dataset cifar100 --visible-classes all   # the asymmetric baseline
    python train_online.py --dataset cifar100 --recipe released       # the released pipeline

The hyper-parameters default to the released ones; `--recipe released` sets every released
behaviour that changes numbers.
"""

import argparse
import contextlib
import fcntl
import functools
import io
import itertools
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import namedtuple
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapter
import clip_model
import evaluate
import lora
import stream

# ---- the loss ----


def symmetric_loss(image_features, text_features, labels, visible, scale, double_softmax=False):
    """L = mean_i CE(s * <f_i, g_c> over c in `visible`, y_i): SIT when `visible` = C_B, the
    classes in the batch. image_features (B, D) and text_features (len(visible), D) are
    L2-normalized, row j for class visible[j]; scale is s = exp(logit_scale), not logit_scale."""
    is_label = labels[:, None] == visible[None, :]  # (B, V)
    if not is_label.any(dim=1).all():
        missing = labels[~is_label.any(dim=1)].unique().tolist()
        raise ValueError(f"labels {missing} are not among the visible classes {visible.tolist()}")
    targets = is_label.int().argmax(dim=1)  # position of y_i in `visible`
    logits = scale * image_features @ text_features.t()  # (B, V)
    if double_softmax:  # the released code's quirk: its model returns probabilities, CE softmaxes again
        logits = logits.softmax(dim=-1)
    return F.cross_entropy(logits.float(), targets.to(logits.device, non_blocking=True))


def text_gradient_parts(image_features, text_features, labels, visible, scale, double_softmax=False):
    """The positive and negative parts of dL/dg_c, each (V, D), for the visible classes (Figure 2):
    dL/dg_c = (s/|B|) sum_i e_ic f_i, with e_i = |B| dL/dz_i for z_i = s <f_i, g>. The positive
    part sums over the samples of class c, the negative part over all others. On logits
    e = p - y; under the double softmax, with q = softmax(z) and d = softmax(q) - y,
    e = q * (d - <q, d>) (the gradient through the first softmax)."""
    f = image_features.detach().float()
    z = scale * f @ text_features.detach().float().t()  # (B, V)
    y = (labels[:, None] == visible[None, :]).float()  # (B, V) one-hot over the visible classes
    if double_softmax:
        q = z.softmax(dim=-1)
        d = q.softmax(dim=-1) - y
        e = q * (d - (q * d).sum(dim=-1, keepdim=True))
    else:
        e = z.softmax(dim=-1) - y
    per_sample = float(scale) / len(labels)
    return per_sample * (y * e).t() @ f, per_sample * ((1 - y) * e).t() @ f


# ---- one step ----


def make_optimizer(model, lr, weight_decay):
    """AdamW over the PEFT parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].is_cuda  # one kernel for the whole update on the GPU; same arithmetic
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def sit_step(model, optimizer, images, labels, visible, text_features_of, augment, scale,
             amp=contextlib.nullcontext, double_softmax=False):
    """One gradient step on one augmented copy of the batch; returns the loss, f and g. labels and
    visible on the host; augment: uint8 (B, 3, H, W) -> model input; text_features_of: ids -> (V, D)."""
    model.train()
    images = images.to(scale.device, non_blocking=True)
    with amp():
        f = F.normalize(model.encode_image(augment(images)), dim=-1)
        g = text_features_of(visible)
        loss = symmetric_loss(f, g, labels, visible, scale, double_softmax)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), f.detach(), g.detach()


# ---- the online loop and its anytime evaluation ----


def train(model, batches, *, task_sizes, text_features_of, test, augment, log, online_iter=3,
          lr=5e-4, weight_decay=1e-5, eval_period=1000, visible_classes="batch",
          double_softmax=False, amp=contextlib.nullcontext, memory=None):
    """The paper's online protocol on a stream of batches (stream.StreamBatch), each seen once;
    `log` (a RunLog) gets every step, batch and evaluation. memory: optional replay."""
    trains = is_tuned(model)  # zero-shot CLIP (nothing trainable) is only evaluated
    scale = model.logit_scale.exp().detach()  # s, frozen
    # A task ends when the stream reaches its cumulative size. Leading empty tasks (a random cut
    # can make them) end before the first batch, with no evaluation (released: a crash).
    task_ends = [end for end in itertools.accumulate(task_sizes) if end > 0]
    seen = torch.zeros(0, dtype=torch.long)  # class ids in order of first appearance (on the host)
    samples = 0
    next_eval = eval_period
    task = None
    for batch in batches:
        # AdamW, re-created at the start of each task (as released)
        if trains and batch.task != task:
            optimizer = make_optimizer(model, lr, weight_decay)
        task = batch.task
        # a class becomes seen at its first batch, and trains in that same batch
        in_order = torch.tensor(list(dict.fromkeys(batch.labels.tolist())), dtype=torch.long)
        seen = torch.cat([seen, in_order[~torch.isin(in_order, seen)]])
        # online_iter gradient steps, each on its own freshly augmented copy of the batch
        for it in range(online_iter if trains else 0):
            images = batch.images[it]
            labels = batch.labels
            if memory is not None:  # replay: the batch includes memory samples, C_B their labels
                images, labels = memory.extend(images, labels)
            visible = labels.unique() if visible_classes == "batch" else seen  # C_B (SIT) or all
            loss, f, g = sit_step(model, optimizer, images, labels, visible, text_features_of,
                                  augment, scale, amp, double_softmax)
            log.step(loss, f, g, labels, visible, samples, task)
        if memory is not None:  # after training on the batch, as the released ER
            memory.add(batch.indices.tolist())
        samples += len(batch.labels)
        log.batch(samples, seen)
        # anytime evaluation past each eval_period samples (as released), and one at each task end
        events = []
        if samples > next_eval:
            next_eval += eval_period
            events.append("anytime")
        while task_ends and task_ends[0] <= samples:
            task_ends.pop(0)
            events.append("task_end")
        if events:
            acc, per_class = evaluate.evaluate_seen(test, text_features_of, seen, amp)
            for event in events:
                log.evaluation(event, samples, acc, per_class, seen.tolist())
    return model


# ---- machinery: what `train` is handed (feature caches, the run folder, replay; not the method) ----


def is_tuned(module):
    """Whether any parameter of this module (a tower) trains."""
    return any(p.requires_grad for p in module.parameters())


class FeatureCache:
    """Normalized features by id (a class, a test image): encode(ids); with cache=True (a frozen
    tower) once per id in the run (bookkeeping on the host: no device syncs)."""

    def __init__(self, encode, n, dim, device, cache):
        self.encode = encode
        self.cache = cache
        self.features = torch.zeros(n, dim, device=device)
        self.cached = torch.zeros(n, dtype=torch.bool)

    def __call__(self, ids):
        """(len(ids), D) features of these ids (a CPU tensor); with grad when the tower trains."""
        if not self.cache:
            return self.encode(ids)
        missing = ids[~self.cached[ids]]
        if len(missing):  # e.g. a class seen for the first time
            with torch.no_grad():
                self.features[missing.to(self.features.device)] = self.encode(missing).float()
            self.cached[missing] = True
        return self.features[ids.to(self.features.device, non_blocking=True)]


def text_features_of_classes(model, class_names, prompt, cache=True):
    """g_c by class id (a callable): the text features of `prompt` with each class name."""
    tokens = clip_model.prompt_tokens(model, class_names, prompt)  # (C, T), on the model's device

    def encode(classes):
        ids = classes.to(tokens.device, non_blocking=True)
        return F.normalize(model.encode_text(tokens[ids]), dim=-1)
    cache = cache and not is_tuned(model.transformer)
    return FeatureCache(encode, len(class_names), model.config.embed_dim, tokens.device, cache)


class TestImages:
    """The test split as one uint8 tensor on the device; features_of(indices): theirs."""

    def __init__(self, model, batches, transform, batch_size, cache=True):
        self.model = model
        self.transform = transform  # uint8 (N, 3, H, W) -> the normalized model input
        self.batch_size = batch_size
        images, labels = zip(*batches)
        self.images = torch.cat(images).to(model.positional_embedding.device)  # (N, 3, H, W) uint8
        self.labels = torch.cat(labels)  # on the host: the seen classes' samples need no device sync
        cache = cache and not is_tuned(model.visual)
        dim = model.config.embed_dim
        self.features_of = FeatureCache(self.encode, len(self.labels), dim, self.images.device, cache)

    def encode(self, indices):
        indices = indices.to(self.images.device, non_blocking=True)
        chunks = [self.transform(self.images[chunk]) for chunk in indices.split(self.batch_size)]
        return torch.cat([F.normalize(self.model.encode_image(x), dim=-1).float() for x in chunks])


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the run stops and keeps what it measured before."""


class RunLog:
    """What `train` reports to: OUT/results.json, OUT/log.jsonl, the progress bar, the running
    loss (a NaN stops the run), grad_log (OUT/grad.jsonl, Figure 2) and save() at task ends."""

    def __init__(self, out, config, class_names, split, bar, log_every=10, grad_log=None, save=None,
                 scale=None, double_softmax=False):
        self.out = out
        self.bar = bar
        self.log_every = log_every
        self.grad_log = grad_log
        self.save = save
        self.scale = scale
        self.double_softmax = double_softmax
        self.running_loss = torch.zeros(())  # on the device: no host sync per step; a NaN stays
        self.steps = 0
        self.batches = 0
        self.acc = None  # the latest, for the progress bar
        self.data = {"config": config, "status": "running", "class_names": list(class_names),
                     "seen_classes": [], "disjoint_classes": split.disjoint_classes,
                     "blurry_classes": split.blurry_classes, "anytime": [], "task_end_samples": [],
                     "task_acc": [], "class_acc": []}
        self.metrics = evaluate.lifelong_metrics([], [], [])  # A_auc, A_avg, A_last, F_last
        self.data.update(self.metrics)
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "log.jsonl"), "w").close()
        self.write()

    def step(self, loss, f, g, labels, visible, samples, task):
        """After each gradient step."""
        self.running_loss = loss if self.steps == 0 else 0.9 * self.running_loss + 0.1 * loss
        if self.grad_log is not None:
            log_gradient_parts(self.grad_log, f, g, labels, visible, self.scale,
                               self.double_softmax, self.steps, samples, task)
        self.steps += 1

    def batch(self, samples, seen):
        """The bar; every log_every batches, the loss (a host sync)."""
        self.bar.update(samples - self.bar.n)
        self.batches += 1
        if self.batches % self.log_every == 0:
            self.check_finite(samples)
            loss = f"{self.running_loss.item():.3f}"
            self.bar.set_postfix(loss=loss, acc=self.acc, seen=len(seen), refresh=False)

    def evaluation(self, event, samples, acc, per_class, seen):
        """After each evaluation ("anytime" or "task_end"): the metrics so far, written."""
        self.check_finite(samples)
        d = self.data
        entry = {"event": event, "samples": samples, "acc": acc, "n_seen": len(seen)}
        if event == "anytime":
            d["anytime"].append({"samples": samples, "acc": acc})
        else:
            entry["task"] = len(d["task_acc"])
            entry["class_acc"] = {str(c): a for c, a in per_class.items()}
            d["task_end_samples"].append(samples)
            d["task_acc"].append(acc)
            d["class_acc"].append([per_class.get(c) for c in range(len(d["class_names"]))])
        with JsonLines(os.path.join(self.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        d["seen_classes"] = list(seen)
        anytime_accs = [a["acc"] for a in d["anytime"]]
        self.metrics = evaluate.lifelong_metrics(anytime_accs, d["task_acc"], d["class_acc"])
        d.update(self.metrics)
        self.acc = acc
        self.write()
        if event == "task_end" and self.save is not None:
            self.save()

    def check_finite(self, samples):
        if not torch.isfinite(self.running_loss):
            raise NonFiniteLoss(f"the loss became non-finite (NaN or inf) before sample {samples}; "
                                "try a lower --lr or --precision fp32")

    def write(self, status=None):
        if status is not None:
            self.data["status"] = status
        data = json.dumps(self.data, indent=1).encode()
        stream.write_file(os.path.join(self.out, "results.json"), data)


class JsonLines(io.FileIO):
    """A .jsonl file whose lines are whole: one cut short (a full disk) is taken back."""

    def write(self, line):
        end = self.seek(0, os.SEEK_END)
        data = memoryview(line.encode())
        try:
            while data:  # a short write: the disk is full
                data = data[super().write(data):]
        except OSError as e:
            self.truncate(end)
            raise OSError(e.errno, e.strerror, self.name) from None


def save_torch(path, obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    stream.write_file(path, buffer.getvalue())


def save_peft(path, model, info):
    """OUT/peft.pt: the LoRA/adapter tensors and `info` (what rebuilds the model)."""
    if info["peft"] == "lora":
        state_dict = lora.lora_state_dict(model)
    else:
        state_dict = adapter.adapter_state_dict(model)
    save_torch(path, {"state_dict": {k: v.cpu() for k, v in state_dict.items()}, **info})


class ReservoirMemory:
    """Reservoir sampling over the stream, as the released code's optional replay memory."""

    def __init__(self, size, batch_size, seed, load):
        self.size = size
        self.batch_size = max(1, batch_size // 2)  # a memory batch is half a stream batch
        self.seed = seed
        self.load = load  # stream.stream_batches over the training set, one augmented copy
        self.indices = []
        self.n_streamed = 0
        self.steps = 0  # gradient steps so far: one extend() each
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, indices):
        for index in indices:
            self.n_streamed += 1
            if len(self.indices) < self.size:
                self.indices.append(index)
            else:
                j = int(torch.randint(self.n_streamed, (1,), generator=self.generator))
                if j < self.size:
                    self.indices[j] = index

    def extend(self, images, labels):
        """The stream batch and a freshly augmented memory batch."""
        self.steps += 1
        if not self.indices:
            return images, labels
        picks = torch.randperm(len(self.indices), generator=self.generator)[:self.batch_size]
        picked = [self.indices[i] for i in picks.tolist()]
        (mem,) = self.load([picked], len(picks), seed=self.seed * 1_000_003 + self.steps - 1)
        return torch.cat([images, mem.images[0]]), torch.cat([labels, mem.labels])


def log_gradient_parts(log, f, g, labels, visible, scale, double_softmax, step, samples, task):
    """One line of OUT/grad.jsonl: per visible class, the norms of text_gradient_parts."""
    labels = labels.to(f.device)
    visible = visible.to(f.device)
    positive, negative = text_gradient_parts(f, g, labels, visible, scale, double_softmax)
    line = {"step": step, "samples": samples, "task": task, "classes": visible.tolist(),
            "in_batch": torch.isin(visible, labels).tolist(),
            "pos": positive.norm(dim=-1).tolist(), "neg": negative.norm(dim=-1).tolist()}
    log.write(json.dumps(line) + "\n")


# ---- a run: model, data and stream from the configuration, then the loop with its outputs ----

# Each released behaviour that changes numbers is a switch (README, "Differences from the released
# code").
RECIPES = {
    "ours": dict(lora_init="zero", double_softmax=False, augment_per="sample", normalize="clip",
                 test_resize="centre", class_names="readable", image_fit="centre", precision="auto",
                 eval_split="test", zero_shot_protocol="ours", replay_classes="batch"),
    "released": dict(lora_init="released", double_softmax=True, augment_per="batch", normalize="dataset",
                     test_resize="squash", class_names="raw", image_fit="random", precision="fp32",
                     eval_split="train", zero_shot_protocol="released", replay_classes="seen"),
}

# --smoke: a tiny random CLIP (byte-level vocabulary: no file, no network) and 10 grating classes.
SMOKE_CONFIG = replace(clip_model.TINY_CONFIG, vocab_size=clip_model.BYTE_VOCAB_SIZE, vision_heads=4,
                       transformer_heads=4)
# Its defaults: 2 tasks, batches of 16, lr 20x the released: seconds on a CPU.
SMOKE_SETTINGS = dict(dataset="smoke", batch_size=16, lr=1e-2, n_tasks=2, eval_period=100)

# What a run derives from its configuration; model_path: the checkpoint peft.pt rebuilds from.
Run = namedtuple("Run", "model train_set test_set split device out model_path prompt_names mean std")


def apply_peft(model, peft, encoder, **peft_args):
    """LoRA or adapters on the chosen tower(s), everything else frozen."""
    if peft == "lora":
        return lora.apply_lora(model, encoder=encoder, **peft_args)
    if peft == "adapter":
        return adapter.apply_adapter(model, encoder=encoder, **peft_args)
    return model.requires_grad_(False)


def peft_arguments(config):
    """The keyword arguments of apply_lora / apply_adapter (saved in peft.pt)."""
    if config.peft == "lora":
        return dict(r=config.lora_r, alpha=config.lora_alpha, init=config.lora_init)
    if config.peft == "adapter":
        return dict(bottleneck=config.adapter_bottleneck, scale=config.adapter_scale,
                    dropout=config.adapter_dropout)
    return {}


def compile_towers(model, cache=True):
    """--compile: torch.compile the towers run at every step (tuned, or frozen without cache)."""
    for tower in (model.visual, model.transformer):
        if not cache or is_tuned(tower):
            tower.compile()


def default_out(config):
    """runs/<dataset>-<scenario>-<peft>[-<tower>-<visible>][-released]-seed<k>, never an existing
    folder."""
    parts = [config.dataset, config.scenario, config.peft]
    if config.peft != "none":
        parts += [config.encoder, config.visible_classes]
    if config.recipe != "ours":
        parts.append(config.recipe)
    out = base = os.path.join("runs", "-".join(parts + [f"seed{config.seed}"]))
    for k in itertools.count(2):
        if not os.path.exists(out):
            return out
        out = f"{base}-{k}"


def check_out(out, overwrite):
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not a folder this process can write to")
    if not overwrite and evaluate.is_finished(os.path.abspath(out)):
        raise ValueError(f"--out {out} holds a finished run: --overwrite replaces it; or another --out, "
                         "or grid --skip-finished")


# A run's files and evaluate.py's plots: an earlier run's go.
RUN_FILES = ("results.json", "log.jsonl", "grad.jsonl", "peft.pt", "smoke_clip.pt", "zero_shot.json",
             "plot.png", "grad.png")


def claim_run_folder(out, overwrite, locks):
    """OUT, locked by OUT/run.lock (an flock: freed if the process dies) until `locks` closes,
    emptied of an earlier run's files."""
    os.makedirs(out, exist_ok=True)
    lock = locks.enter_context(open(os.path.join(out, "run.lock"), "a"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"--out {out}: another run is writing to it; use another --out") from None
    check_out(out, overwrite)  # again, locked: it may have finished since
    for name in RUN_FILES + tuple(name + ".tmp" for name in RUN_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
    if os.path.isdir(os.path.join(out, "untrained")):  # --smoke's baseline, a run folder inside
        shutil.rmtree(os.path.join(out, "untrained"))


def load_data(config):
    """The stream's dataset and the evaluation's, checked."""
    if config.smoke:
        train_set = stream.SyntheticDataset(10, per_class=100, image_size=32, seed=0, train=True)
        test_set = stream.SyntheticDataset(10, per_class=20, image_size=32, seed=0, train=False)
    else:
        train_set = stream.load_dataset(config.dataset, config.data_root, train=True)
        test_train = config.eval_split == "train"
        test_set = stream.load_dataset(config.dataset, config.data_root, train=test_train)
    n_classes = len(train_set.classes)
    if list(train_set.classes) != list(test_set.classes):
        raise stream.DataError(f"{config.data_root}: train and test splits have different classes")
    if n_classes < 2:
        raise ValueError(f"--data-root {config.data_root}: {n_classes} class; expected 2 or more")
    if config.n_tasks > n_classes:
        raise ValueError(f"--n-tasks {config.n_tasks}: expected at most {n_classes}, the data's classes")
    return train_set, test_set


def fetch(config):
    """(model, train_set, test_set, zero-shot datasets), downloaded where missing."""
    train_set, test_set = load_data(config)  # the data first: bad data fails before a download
    if config.smoke:
        torch.manual_seed(0)
        model = clip_model.CLIP(SMOKE_CONFIG).eval()
    else:
        model = clip_model.load(config.model, act=None if config.act == "auto" else config.act)
        clip_model.get_tokenizer(model.config.vocab_size)  # OpenAI's BPE vocabulary, or fetched
    zero_shot = {}
    if config.zero_shot_eval:
        zero_shot = evaluate.fetch_zero_shot(config.zero_shot_datasets, config.data_root,
                                             config.zero_shot_protocol)
    return model, train_set, test_set, zero_shot


def prepare_run(config, locks):
    """Model, data and stream, or a clear error before any run folder; then the run folder,
    locked until `locks` closes."""
    device = torch.device(clip_model.resolve_device(config.device))  # cuda without a GPU: an error
    out = config.out or default_out(config)
    check_out(out, config.overwrite)
    model, train_set, test_set, _ = fetch(config)
    model_path = config.model
    if config.smoke:
        model_path = os.path.join(out, "smoke_clip.pt")
    prompt_names = list(train_set.classes)
    if config.class_names == "raw":
        prompt_names = list(train_set.raw_classes)
    clip_model.prompt_tokens(model, prompt_names, config.prompt)  # too long a prompt fails here
    mean = model.config.image_mean  # --normalize clip; dataset: the released choice
    std = model.config.image_std
    if config.normalize == "dataset":  # measured for image folders and --smoke
        mean, std = stream.DATASET_STATS.get(config.dataset) or stream.channel_stats(train_set)
    split = stream.si_blurry_split(train_set.targets, len(train_set.classes), config.n_tasks,
                                   config.n, config.m, config.seed, config.stochastic)
    claim_run_folder(out, config.overwrite, locks)  # all checked: the run folder
    if config.smoke:  # the model peft.pt rebuilds from
        save_torch(model_path, model.state_dict())
    torch.manual_seed(config.seed)  # LoRA's random A (and adapter dropout) follow the run seed
    model = apply_peft(model, config.peft, config.encoder, **peft_arguments(config)).to(device)
    if config.compile:
        compile_towers(model, cache=not config.no_cache)
    return Run(model, train_set, test_set, split, device, out, model_path, prompt_names, mean, std)


def peft_info(config, settings, run):
    """peft.pt beside the tensors: what rebuilds the model and its inputs."""
    keys = ("model", "act", "peft", "encoder", "prompt", "dataset", "mean", "std", "test_resize")
    recipe = {k: getattr(config, k) for k in RECIPES[config.recipe]}  # the switches as run
    return {**{k: settings[k] for k in keys}, "peft_args": peft_arguments(config),
            "class_names": run.prompt_names, "recipe": recipe}


def run_stream(config, run):
    """Train and evaluate on the stream, writing the run folder as it goes; returns the metrics."""
    model = run.model
    image_size = model.visual.image_size
    cache = not config.no_cache
    load_size = image_size  # variable-size images are fitted when loaded, so that they batch
    if config.dataset in ("cifar100", "tinyimagenet", "smoke"):
        load_size = None
    policy = "cifar10" if config.dataset in ("cifar100", "smoke") else "imagenet"  # AutoAugment's
    settings = {**config._asdict(), "act": model.config.act, "model": run.model_path, "out": run.out,
                "mean": list(run.mean), "std": list(run.std)}  # the configuration, resolved
    save = None
    if config.peft != "none":
        peft_path = os.path.join(run.out, "peft.pt")
        save = functools.partial(save_peft, peft_path, model, peft_info(config, settings, run))
    grad_log = None
    if config.grad_analysis:
        grad_log = JsonLines(os.path.join(run.out, "grad.jsonl"), "w")
    bar = tqdm(total=sum(map(len, run.split.tasks)), unit="img", dynamic_ncols=True,
               disable=config.quiet)
    log = RunLog(run.out, settings, run.prompt_names, run.split, bar, config.log_every, grad_log, save,
                 model.logit_scale.exp().detach(), config.double_softmax)
    try:
        text_features_of = text_features_of_classes(model, run.prompt_names, config.prompt, cache)
        test_batches = stream.eval_batches(run.test_set, range(len(run.test_set)),
                                           config.eval_batch_size, config.workers,
                                           image_size=load_size, resize=config.test_resize,
                                           image_fit=config.image_fit, seed=config.seed)
        test_transform = functools.partial(stream.eval_transform, image_size=image_size,
                                           resize=config.test_resize, mean=run.mean, std=run.std)
        test = TestImages(model, test_batches, test_transform, config.eval_batch_size, cache=cache)
        augment = stream.BatchAugment(image_size, seed=config.seed, mean=run.mean, std=run.std,
                                      per=config.augment_per)
        batches_of = functools.partial(stream.stream_batches, run.train_set, policy=policy,
                                       image_size=load_size, augment_per=config.augment_per,
                                       image_fit=config.image_fit)
        if config.peft == "none":  # zero-shot CLIP trains nothing: the labels alone, no image read
            batches = stream.stream_labels(run.train_set, run.split.tasks, config.batch_size)
        else:
            batches = batches_of(run.split.tasks, config.batch_size, config.online_iter,
                                 workers=config.workers, seed=config.seed)
        memory = None
        if config.memory_size > 0:  # a memory batch: one freshly augmented copy
            load = functools.partial(batches_of, online_iter=1, workers=0)
            memory = ReservoirMemory(config.memory_size, config.batch_size, config.seed, load)
        visible_classes = config.visible_classes
        if config.memory_size and config.replay_classes == "seen":  # released: replay means "all"
            visible_classes = "all"
        start = time.time()
        with bar, grad_log or contextlib.nullcontext():
            train(model, batches, task_sizes=[len(t) for t in run.split.tasks],
                  text_features_of=text_features_of, test=test, augment=augment, log=log,
                  online_iter=config.online_iter, lr=config.lr, weight_decay=config.weight_decay,
                  eval_period=config.eval_period, visible_classes=visible_classes,
                  double_softmax=config.double_softmax,
                  amp=clip_model.autocast(run.device, config.precision), memory=memory)
        log.data["config"]["wall_time_s"] = round(time.time() - start, 1)
        log.write(status="finished")
    except BaseException as e:  # Ctrl-C, SIGTERM: what was measured stays, and how it ended
        with contextlib.suppress(OSError):  # a full disk: the last results.json stays
            log.write(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
    return log.metrics


# ---- command line: everything checked, and fetched from the network, before any work starts ----


def parse_args(argv=None):
    """The run configuration, checked and frozen; a flag given wins over --scenario, --recipe, --smoke."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=evaluate.HelpWithDefaults,
                                usage="%(prog)s [--smoke | --dataset NAME] [options] (all: --help)")
    arg = p.add_argument
    in_range = evaluate.in_range
    count = in_range(int, 0)
    positive = in_range(int, 1)
    rate = in_range(float, 0, torch.finfo(torch.float32).max, above=True)
    arg("--dataset", default="cifar100", choices=stream.DATASETS, help="the stream's images")
    arg("--data-root", default="data", help="where datasets are (or get downloaded)")
    arg("--model", default="ViT-B/16",
        help=f"one of {clip_model.available_models()} or a checkpoint path")
    arg("--act", default="auto", choices=("auto",) + clip_model.ACTIVATIONS, help="MLP activation")
    arg("--peft", default="lora", choices=("lora", "adapter", "none"), help="none = zero-shot CLIP")
    arg("--encoder", default="both", choices=lora.ENCODERS, help="tower(s) to tune")
    arg("--visible-classes", default="batch", choices=("batch", "all"),
        help="the softmax runs over the batch's classes (SIT) or all seen classes")
    arg("--scenario", default="si-blurry", choices=tuple(stream.SCENARIOS), help="sets N and M")
    arg("--n-tasks", type=positive, default=5, help="T")
    arg("--n", type=in_range(int, 0, 100), help="%% of classes that are disjoint (wins over --scenario)")
    arg("--m", type=in_range(int, 0, 100), help="%% of blurry samples that are blurred (likewise)")
    arg("--seed", type=in_range(int, 0, 2**63 - 1), default=1, help="of the stream, LoRA and augmentation")
    arg("--batch-size", type=positive, default=64, help="of the stream")
    arg("--online-iter", type=positive, default=3, help="gradient steps per incoming batch")
    arg("--lr", type=rate, default=5e-4, help="AdamW's")
    arg("--weight-decay", type=in_range(float, 0), default=1e-5, help="AdamW's")
    arg("--eval-period", type=positive, default=1000, help="samples between anytime evaluations")
    arg("--eval-batch-size", type=positive, default=256, help="test images per forward pass")
    arg("--memory-size", type=count, default=0, help="reservoir replay (SIT: 0, none)")
    arg("--prompt", type=prompt_template, default=clip_model.PROMPT, help="{} is the class name")
    arg("--lora-r", type=positive, default=4, help="LoRA's rank")
    arg("--lora-alpha", type=rate, default=1.0, help="LoRA's scaling is alpha/r")
    arg("--adapter-bottleneck", type=positive, default=64, help="the adapter's hidden width")
    arg("--adapter-scale", type=rate, default=0.1, help="of the adapter's output")
    arg("--adapter-dropout", type=in_range(float, 0, 1), default=0.1, help="in the adapter")
    arg("--no-cache", action="store_true", help="recompute frozen towers' features (same numbers)")
    switch = p.add_argument_group("recipe", "--recipe sets each switch below; a switch given wins").add_argument
    switch("--recipe", default="ours", choices=tuple(RECIPES), help="released = the paper's pipeline")
    switch("--lora-init", choices=lora.INITS, help="B = 0 (zero-shot CLIP at step 0) | random q/k/v")
    switch("--double-softmax", action=argparse.BooleanOptionalAction, help="CE on probabilities")
    switch("--augment-per", choices=stream.AUGMENT_PER, help="random draws per sample | per batch")
    switch("--normalize", choices=("clip", "dataset"), help="the model's mean/std | the dataset's")
    switch("--test-resize", choices=stream.TEST_RESIZES, help="shorter side + centre crop | squashed")
    switch("--class-names", choices=("readable", "raw"), help="underscores become spaces | kept")
    switch("--image-fit", choices=stream.IMAGE_FITS, help="variable-size images: centre | random crop")
    switch("--precision", choices=("auto", "fp32", "bf16"), help="auto = bf16 autocast on CUDA")
    switch("--eval-split", choices=("test", "train"), help="CIFAR-100 evaluated on test | train (a bug)")
    switch("--replay-classes", choices=("batch", "seen"), help="SIT with --memory-size: C_B | all seen")
    switch("--zero-shot-protocol", choices=("ours", "released"), help="see evaluate.py zero-shot --help")
    arg("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if there is one")
    arg("--workers", type=count, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    arg("--out", default=None, help="output folder (default: a readable name under runs/)")
    arg("--overwrite", action="store_true", help="replace a finished run in --out")
    arg("--log-every", type=positive, default=10, help="batches between progress-bar updates")
    arg("--compile", action="store_true", help="torch.compile the towers that run at every step")
    arg("--grad-analysis", action="store_true", help="record the text-feature gradients (Figure 2)")
    arg("--zero-shot-eval", action="store_true", help="zero-shot transfer after training")
    arg("--zero-shot-datasets", type=evaluate.zero_shot_list,
        help="comma-separated, for --zero-shot-eval (default: the paper's five)")
    arg("--download-only", action="store_true", help="fetch everything this run needs, then exit")
    arg("--smoke", action="store_true", help="offline check: a tiny random CLIP learns a toy stream")
    arg("--quiet", action="store_true", help="no progress bar")
    first = p.parse_args(argv)
    if first.smoke and first.dataset != p.get_default("dataset"):
        p.error("--smoke brings its own data; leave out --dataset")
    recipe = dict(RECIPES[first.recipe])
    if first.dataset != "cifar100":  # the released evaluation on training images: its CIFAR bug only
        recipe["eval_split"] = "test"
    scenario = stream.SCENARIOS[first.scenario]
    p.set_defaults(**recipe, **scenario, **(SMOKE_SETTINGS if first.smoke else {}))
    args = p.parse_args(argv)  # again, with these defaults
    return namedtuple("Config", vars(args))(**vars(args))


def prompt_template(text):
    """An argparse type: a prompt with one {} for the class name and no other brace."""
    if text.count("{") != 1 or text.count("}") != 1 or "{}" not in text:
        raise argparse.ArgumentTypeError(f"expected one {{}} for the class name, no other brace; got {text}")
    return text


def download_only(config):
    """--download-only: fetch what this run needs, say where it is."""
    if config.smoke:
        print("--smoke needs nothing from the network")
        return
    model, train_set, test_set, zero_shot = fetch(config)
    root = os.path.abspath(config.data_root)
    print(f"dataset {config.dataset}: {len(train_set)} training and {len(test_set)} test images "
          f"under {root}")
    path = clip_model.checkpoint_path(config.model)  # local by now (SHA256-verified): no connection
    print(f"model {config.model}: {os.path.abspath(path)}")
    if model.config.vocab_size > clip_model.BYTE_VOCAB_SIZE:  # a tokenizer with merges: a BPE file
        vocab = clip_model.bpe_vocab_path()
        theirs = "" if clip_model.is_openai_vocabulary(vocab) else " (NOT OpenAI's)"
        print(f"BPE vocabulary: {vocab}{theirs}")
    for name, (_, indices, _) in zero_shot.items():
        print(f"zero-shot {name}: {len(indices)} test images under {root}")
    print("everything this run needs is local: the same command without --download-only runs offline")


def metrics_line(metrics, label=None):
    """'A_auc  52.10 A_avg ... F_last      -' (%, aligned), optionally labelled."""
    values = [f"{k} {100 * v:6.2f}" if v is not None else f"{k}      -" for k, v in metrics.items()]
    line = " ".join(values)
    return f"{line}   ({label})" if label else line


def zero_shot_eval(config, run):
    """Zero-shot transfer of the tuned model to OUT/zero_shot.json."""
    peft_weights = os.path.join(run.out, "peft.pt") if config.peft != "none" else None
    evaluate.zero_shot_eval(run.model, config.zero_shot_datasets, config.data_root, config.prompt,
                            run.device, run.out, run.model_path, peft_weights,
                            config.zero_shot_protocol, workers=config.workers, mean=run.mean,
                            std=run.std, resize=config.test_resize, precision=config.precision)


def run_command(config, locks):
    """Exit status 0; 2: refused, nothing made; 1: failed midway, what was measured kept."""
    try:
        if config.download_only:
            download_only(config)
            return 0
        run = prepare_run(config, locks)
    except (clip_model.CheckpointError, OSError, ValueError) as e:  # downloads, files, data, flags
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(stream.describe_stream(run.split, run.train_set.targets, run.prompt_names))
    if config.smoke:
        print("--smoke: a tiny random CLIP learns a stream of gratings; its untrained self is the baseline")
    if config.eval_split == "train":
        print("evaluating on CIFAR-100's training split, as the released code did (--eval-split "
              "test: the test split)")
    print(f"writing results to {run.out}")
    try:
        results = run_stream(config, run)
        if config.smoke and config.peft != "none":
            softmax = "all seen classes"
            if config.visible_classes == "batch":
                softmax = "the batch's classes (SIT)"
            print(metrics_line(results, f"{config.peft} on {config.encoder}, softmax over {softmax}"))
            untrained = os.path.join(run.out, "untrained")
            base = config._replace(peft="none", grad_analysis=False, quiet=True, out=untrained)
            print(metrics_line(run_stream(base, prepare_run(base, locks)), "untrained, same stream"))
        else:
            print(metrics_line(results))
        if config.zero_shot_eval:
            zero_shot_eval(config, run)
    except (NonFiniteLoss, stream.DataError, OSError) as e:  # an unreadable image, a full disk
        # the last line: a DataLoader worker puts its traceback before it, and the class name in it
        line = str(e).strip().splitlines()[-1].removeprefix("stream.DataError: ")
        print(f"error: {line}; what was measured is in {run.out}", file=sys.stderr)
        return 1
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a time limit, a preemption): as Ctrl-C."""


def terminate(signum, frame):
    raise Terminated


def reraise_interrupt(hook, unraisable):
    """sys.unraisablehook: a Ctrl-C that Python drops in an after-fork handler as DataLoader
    workers start is sent again, from a thread."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        main_thread = threading.main_thread().ident
        threading.Timer(0.01, signal.pthread_kill, (main_thread, signal.SIGINT)).start()
    else:
        hook(unraisable)


def main(argv=None):
    config = parse_args(argv)
    unraisablehook = sys.unraisablehook
    sys.unraisablehook = functools.partial(reraise_interrupt, unraisablehook)
    sigterm = signal.signal(signal.SIGTERM, terminate)
    try:
        with contextlib.ExitStack() as locks:  # the run folders' locks
            return run_command(config, locks)
    except KeyboardInterrupt as e:  # at any point: a run folder, if made, says "interrupted"
        print("\ninterrupted" + " (SIGTERM)" * isinstance(e, Terminated), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        sys.unraisablehook = unraisablehook
        signal.signal(signal.SIGTERM, sigterm)


if __name__ == "__main__":
    sys.exit(main())
