"""
Online lifelong tuning of CLIP with Symmetric Image-Text (SIT) tuning, on a Si-Blurry stream.

    python train_online.py --smoke                                    # offline check: a tiny random CLIP learns
    python train_online.py --dataset cifar100                         # SIT-LoRA on both towers
    python train_online.py --dataset cifar100 --visible-classes all   # the asymmetric baseline
    python train_online.py --dataset cifar100 --recipe released       # the released pipeline, switch by switch
    python train_online.py --dataset cifar100 --download-only         # fetch everything, then run offline

The hyper-parameters default to the released ones (ViT-B/16, batches of 64, 3 steps per batch, AdamW 5e-4);
`--recipe` (ours by default, or released) sets every released behaviour that changes numbers.
"""

import argparse
import contextlib
import functools
import itertools
import json
import os
import sys
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

# ---- the loss ------------------------------------------------------------------------------------


def visible_classes(labels, seen, mode):
    """The classes the softmax runs over: SIT's C_B (distinct labels in the batch) or every seen class."""
    return torch.unique(labels) if mode == "batch" else seen


def symmetric_loss(image_features, text_features, labels, visible, logit_scale, double_softmax=False):
    """L = mean_i CE(s * <f_i, g_c> over c in `visible`, y_i): SIT when `visible` = C_B, the classes in the batch.
    image_features (B, D) and text_features (len(visible), D) are L2-normalized; row j of text_features
    belongs to class visible[j]; every label must be in `visible`."""
    logits = logit_scale * image_features @ text_features.t()  # (B, V)
    targets = (labels[:, None] == visible[None, :]).int().argmax(dim=1)  # position of y_i in `visible`
    if double_softmax:  # the released code's quirk: its model returns probabilities and CE softmaxes again
        logits = logits.softmax(dim=-1)
    return F.cross_entropy(logits.float(), targets)


def text_gradient_parts(image_features, text_features, labels, visible, logit_scale, double_softmax=False):
    """The positive and negative parts of dL/dg_c, each (V, D), for the visible classes (the paper's Figure 2):
    dL/dg_c = (s/|B|) sum_i e_ic f_i with e_i = |B| dL/dz_i, z_i = s <f_i, g>: the positive part sums over the
    samples of class c, the negative part over all others. On logits e = p - y; under the double softmax, with
    q = softmax(z) and d = softmax(q) - y, e = q * (d - <q, d>) (the gradient through the first softmax)."""
    f = image_features.detach().float()
    z = logit_scale * f @ text_features.detach().float().t()  # (B, V)
    y = (labels[:, None] == visible[None, :]).float()  # (B, V) one-hot over the visible classes
    if double_softmax:
        q = z.softmax(dim=-1)
        d = q.softmax(dim=-1) - y
        e = q * (d - (q * d).sum(dim=-1, keepdim=True))
    else:
        e = z.softmax(dim=-1) - y
    scale = float(logit_scale) / len(labels)
    return scale * (y * e).t() @ f, scale * ((1 - y) * e).t() @ f


# ---- the step ------------------------------------------------------------------------------------


def is_tuned(module):
    """Whether any parameter of this module (a tower) trains."""
    return any(p.requires_grad for p in module.parameters())


def make_optimizer(model, lr, weight_decay):
    """AdamW over the PEFT parameters, re-created at every task start as in the released code."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].is_cuda  # one kernel for the whole update on the GPU; same arithmetic
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def sit_step(model, optimizer, images, labels, visible, text_features, augment, logit_scale,
             amp=contextlib.nullcontext, double_softmax=False):
    """One gradient step on one augmented copy of the batch; returns the loss and the features it used.
    images: uint8 (B, 3, H, W); augment: uint8 batch -> model input; text_features: class ids -> (V, D) features
    (with grad when the text tower trains); visible: the class ids of the softmax, every label among them."""
    model.train()
    device = logit_scale.device
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    with amp():
        f = F.normalize(model.encode_image(augment(images)), dim=-1)
        g = text_features(visible)
        loss = symmetric_loss(f, g, labels, visible.to(device, non_blocking=True), logit_scale, double_softmax)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), f.detach(), g.detach()


# ---- features, with the caches that frozen towers allow ------------------------------------------


class FeatureCache:
    """Normalized features by id (a class, or a test image), computed by encode(ids); while the tower that computes
    them is frozen, each once in the whole run (bookkeeping on the host: no device syncs)."""

    def __init__(self, encode, n, dim, device, frozen):
        self.encode = encode
        self.frozen = frozen
        self.cache = torch.zeros(n, dim, device=device)
        self.cached = torch.zeros(n, dtype=torch.bool)

    def __call__(self, ids):
        """(len(ids), D) features of these ids (a CPU tensor); with grad when the tower trains."""
        if not self.frozen:
            return self.encode(ids)
        missing = ids[~self.cached[ids]]
        if len(missing):  # e.g. a class seen for the first time: encoded once, for training and evaluation alike
            with torch.no_grad():
                self.cache[missing.to(self.cache.device)] = self.encode(missing).float()
            self.cached[missing] = True
        return self.cache[ids.to(self.cache.device, non_blocking=True)]


def text_feature_cache(model, class_names, prompt, cache=True):
    """g_c by class id: the text features of `prompt` with each class name."""
    device = model.positional_embedding.device
    tokens = clip_model.tokenize([prompt.format(name) for name in class_names], model.config.context_length,
                                 vocab_size=model.config.vocab_size)
    tokens = clip_model.trim_padding(tokens).to(device)

    def encode(classes):
        return F.normalize(model.encode_text(tokens[classes.to(device, non_blocking=True)]), dim=-1)
    frozen = cache and not is_tuned(model.transformer)
    return FeatureCache(encode, len(class_names), model.config.embed_dim, device, frozen)


class TestImages:
    """The test split as one uint8 tensor on the device, and `features`, their image features by index."""

    def __init__(self, model, batches, transform, batch_size, cache=True):
        self.model = model
        self.transform = transform  # uint8 (N, 3, H, W) -> the normalized model input
        self.batch_size = batch_size
        images, labels = zip(*batches)
        self.images = torch.cat(images).to(model.positional_embedding.device)  # (N, 3, H, W) uint8
        self.labels = torch.cat(labels)  # on the host: the seen classes' samples are chosen without a device sync
        frozen = cache and not is_tuned(model.visual)
        self.features = FeatureCache(self.encode, len(self.labels), model.config.embed_dim, self.images.device, frozen)

    def encode(self, indices):
        indices = indices.to(self.images.device, non_blocking=True)
        return torch.cat([F.normalize(self.model.encode_image(self.transform(self.images[chunk])), dim=-1).float()
                          for chunk in indices.split(self.batch_size)])


@torch.inference_mode()
def evaluate_seen(test, text_features, seen, amp=contextlib.nullcontext):
    """Top-1 accuracy on the test images of the seen classes, predicting among the seen classes only."""
    test.model.eval()
    indices = stream.seen_test_indices(test.labels, seen)
    with amp():
        g = text_features(seen)
        f = test.features(indices)
    return evaluate.top1_on_seen(f, test.labels[indices], g, seen.tolist())


# ---- the online loop -----------------------------------------------------------------------------


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the run stops and keeps what it measured before."""


def check_finite(running_loss, samples):
    """Stop the run with a clear message once the (device-side) running loss is NaN or inf."""
    if not torch.isfinite(running_loss):
        raise NonFiniteLoss(f"the loss became non-finite (NaN or inf) before sample {samples}; "
                            "try a lower --lr or --precision fp32")


def train(model, batches, task_sizes, text_features, test, augment, report, online_iter=3, lr=5e-4,
          weight_decay=1e-5, eval_period=1000, visible="batch", double_softmax=False, amp=contextlib.nullcontext,
          memory=None, grad_log=None, progress=None):
    """The online protocol: each batch (stream.StreamBatch) is seen once; its new classes become seen, and trainable,
    on arrival; `online_iter` steps on it with fresh augmentation; anytime evaluation every `eval_period` samples and
    one at each task end, each passed to report(event, samples, accuracy, per-class accuracy, seen classes).
    With no trainable parameter (zero-shot CLIP) it only evaluates."""
    trains = is_tuned(model)
    logit_scale = model.logit_scale.exp().detach()  # s, frozen
    task_ends = torch.tensor(task_sizes).cumsum(0).tolist()
    # Leading empty tasks (a random cut can leave a task without classes) get no task end (released: a crash).
    n_ended = sum(end == 0 for end in task_ends)
    seen = torch.zeros(0, dtype=torch.long)  # class ids in order of first appearance (on the host)
    samples, next_eval, step, task, optimizer = 0, eval_period, 0, None, None
    running_loss = torch.zeros(())  # kept on the device: no host sync per step, and a NaN in it stays there
    for batch in batches:
        if trains and batch.task != task:  # a new task: the released code re-creates the optimizer here
            optimizer = make_optimizer(model, lr, weight_decay)
        task = batch.task
        known = set(seen.tolist())
        new = [c for c in dict.fromkeys(batch.labels.tolist()) if c not in known]
        seen = torch.cat([seen, torch.tensor(new, dtype=torch.long)])  # seen, and trainable in this same batch
        for it in range(online_iter if trains else 0):
            images, labels = batch.images[it], batch.labels
            classes = visible_classes(labels, seen, visible)
            if memory is not None:  # optional replay (SIT uses none); as released, it puts all seen classes in the loss
                images, labels = memory.extend(images, labels, step)
                classes = seen
            loss, f, g = sit_step(model, optimizer, images, labels, classes, text_features, augment, logit_scale,
                                  amp, double_softmax)
            if grad_log is not None:  # optional: the gradient on the text features (Figure 2)
                log_gradient_parts(grad_log, f, g, labels, classes, logit_scale, double_softmax, step, samples, task)
            running_loss = loss if step == 0 else 0.9 * running_loss + 0.1 * loss
            step += 1
        if memory is not None:  # after training on the batch, as the released ER
            memory.add(batch.indices.tolist())
        samples += len(batch.labels)
        if progress is not None:
            progress(samples, running_loss, seen)
        if samples > next_eval:  # anytime evaluation, as released: when the counter passes the next point
            next_eval += eval_period
            check_finite(running_loss, samples)
            report("anytime", samples, *evaluate_seen(test, text_features, seen, amp), seen.tolist())
        while n_ended < len(task_ends) and task_ends[n_ended] <= samples:  # (empty tasks end together)
            check_finite(running_loss, samples)
            report("task_end", samples, *evaluate_seen(test, text_features, seen, amp), seen.tolist())
            n_ended += 1
    return model


class ReservoirMemory:
    """Reservoir sampling over the stream, as the released code's optional replay memory."""

    def __init__(self, size, batch_size, seed, load):
        self.size = size
        self.batch_size = max(1, batch_size // 2)  # a memory batch is half a stream batch
        self.seed = seed
        self.load = load  # stream.stream_batches over the training set, one augmented copy
        self.indices = []
        self.n_streamed = 0
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

    def extend(self, images, labels, step):
        """The stream batch followed by a memory batch, freshly augmented (unchanged while the memory is empty)."""
        if not self.indices:
            return images, labels
        picks = torch.randperm(len(self.indices), generator=self.generator)[:self.batch_size]
        (mem,) = self.load([[self.indices[i] for i in picks.tolist()]], len(picks), seed=self.seed * 1_000_003 + step)
        return torch.cat([images, mem.images[0]]), torch.cat([labels, mem.labels])


def log_gradient_parts(log, f, g, labels, visible, logit_scale, double_softmax, step, samples, task):
    """One line of OUT/grad.jsonl: per visible class, the positive and negative gradient on its text feature."""
    labels, visible = labels.to(f.device), visible.to(f.device)
    positive, negative = text_gradient_parts(f, g, labels, visible, logit_scale, double_softmax)
    log.write(json.dumps({"step": step, "samples": samples, "task": task, "classes": visible.tolist(),
                          "in_batch": torch.isin(visible, labels).tolist(), "pos": positive.norm(dim=-1).tolist(),
                          "neg": negative.norm(dim=-1).tolist()}) + "\n")


# ---- results that survive: written atomically as they are measured -------------------------------


class Results:
    """OUT/results.json (rewritten after every evaluation) and OUT/log.jsonl (appended as it happens)."""

    def __init__(self, out, config, class_names, split):
        os.makedirs(out, exist_ok=True)
        self.out = out
        self.data = {"config": config, "status": "running", "class_names": list(class_names), "seen_classes": [],
                     "disjoint_classes": split.disjoint_classes, "blurry_classes": split.blurry_classes,
                     "anytime": [], "task_end_samples": [], "task_acc": [], "class_acc": []}  # + the 4 metrics
        open(os.path.join(out, "log.jsonl"), "w").close()
        self.write()

    def record(self, event, samples, acc, per_class, seen):
        """One evaluation ("anytime" or "task_end"), written at once."""
        d = self.data
        entry = {"event": event, "samples": samples, "acc": acc, "n_seen": len(seen)}
        if event == "anytime":
            d["anytime"].append({"samples": samples, "acc": acc})
        else:
            entry.update(task=len(d["task_acc"]), class_acc={str(c): a for c, a in per_class.items()})
            d["task_end_samples"].append(samples)
            d["task_acc"].append(acc)
            d["class_acc"].append([per_class.get(c) for c in range(len(d["class_names"]))])
        with open(os.path.join(self.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        d["seen_classes"] = list(seen)
        self.write()

    def write(self, status=None):
        d = self.data
        d["status"] = status or d["status"]
        d.update(evaluate.lifelong_metrics([a["acc"] for a in d["anytime"]], d["task_acc"], d["class_acc"]))
        evaluate.write_json(os.path.join(self.out, "results.json"), d)


def save_peft(path, model, record):
    """OUT/peft.pt: the trained LoRA/adapter tensors, and in `record` what rebuilds the tuned model and its inputs."""
    state_dict = lora.lora_state_dict(model) if record["peft"] == "lora" else adapter.adapter_state_dict(model)
    tmp = path + ".tmp"
    torch.save({"state_dict": {k: v.cpu() for k, v in state_dict.items()}, **record}, tmp)
    os.replace(tmp, path)


# ---- a run: model, data and stream from the configuration, then the loop with its outputs --------


def apply_peft(model, peft, encoder, **peft_args):
    """LoRA or adapters on the chosen tower(s), everything else frozen; peft="none" freezes everything."""
    if peft == "lora":
        return lora.apply_lora(model, encoder=encoder, **peft_args)
    if peft == "adapter":
        return adapter.apply_adapter(model, encoder=encoder, **peft_args)
    return model.requires_grad_(False)


def peft_arguments(config):
    """The keyword arguments of apply_lora / apply_adapter this run uses (saved in peft.pt): the run's --lora-X or
    --adapter-X flags are their argument X."""
    prefix = config.peft + "_"
    return {name[len(prefix):]: value for name, value in config._asdict().items() if name.startswith(prefix)}


def compile_towers(model, cache=True):
    """--compile: torch.compile, in place, each tower that runs at every step (a tuned one, or any without cache)."""
    # A frozen tower behind its cache runs once per class or test image: compiling it would cost more than it saves.
    for tower in (model.visual, model.transformer):
        if not cache or is_tuned(tower):
            tower.compile()


# What a run derives from its configuration; model_path: the checkpoint peft.pt rebuilds from (--smoke: OUT's).
Setup = namedtuple("Setup", "model train_set test_set split device out model_path prompt_names mean std")


# --smoke: a tiny random CLIP (byte-level vocabulary: no file, no network) and 10 grating classes it can learn.
SMOKE_CONFIG = replace(clip_model.TINY_CONFIG, vocab_size=clip_model.BYTE_VOCAB_SIZE, vision_heads=4,
                       transformer_heads=4)
# Its defaults (an explicit flag wins): 1,000 images in 2 tasks, batches of 16, lr 20x the released: seconds on a CPU.
SMOKE_SETTINGS = dict(dataset="smoke", batch_size=16, lr=1e-2, n_tasks=2, eval_period=100)


def fetch(config):
    """(model, train_set, test_set, {zero-shot dataset: number of images}), each downloaded and verified where
    missing (the BPE vocabulary too), so that nothing after this needs the network."""
    if config.zero_shot_eval:  # a bad name fails before any download
        evaluate.check_zero_shot_names(config.zero_shot_datasets, config.zero_shot_protocol)
    # the data before the model: a bad data root fails before a download
    train_set = stream.load_dataset(config.dataset, config.data_root, train=True)
    test_set = stream.load_dataset(config.dataset, config.data_root, train=config.eval_split == "train")
    model = clip_model.load(config.model, act=None if config.act == "auto" else config.act)
    clip_model.get_tokenizer(model.config.vocab_size)  # OpenAI's BPE vocabulary: found, or downloaded now
    zero_shot = {}
    if config.zero_shot_eval:
        zero_shot = evaluate.fetch_zero_shot(config.zero_shot_datasets, config.data_root, config.zero_shot_protocol)
    return model, train_set, test_set, zero_shot


def setup(config):
    """Model, data and stream, or a clear error before any training starts (and before any run folder exists,
    except --smoke's, which saves its tiny model there)."""
    device = torch.device(evaluate.resolve_device(config.device))  # --device cuda without a GPU: a clear error
    out = config.out or default_out(config)
    if config.smoke:
        torch.manual_seed(0)
        model = clip_model.CLIP(SMOKE_CONFIG).eval()
        os.makedirs(out, exist_ok=True)
        model_path = os.path.join(out, "smoke_clip.pt")
        torch.save(model.state_dict(), model_path)
        train_set = stream.SyntheticDataset(num_classes=10, per_class=100, image_size=32, seed=0, train=True)
        test_set = stream.SyntheticDataset(num_classes=10, per_class=20, image_size=32, seed=0, train=False)
    else:
        model, train_set, test_set, _ = fetch(config)
        model_path = config.model
    if list(train_set.classes) != list(test_set.classes):
        raise stream.DataError(f"{config.data_root}: train and test splits have different classes")
    prompt_names = list(train_set.raw_classes if config.class_names == "raw" else train_set.classes)
    mean, std = model.config.image_mean, model.config.image_std  # --normalize clip; dataset: the released choice
    if config.normalize == "dataset":  # measured for image folders and --smoke
        mean, std = stream.DATASET_STATS.get(config.dataset) or stream.channel_stats(train_set)
    split = stream.si_blurry_split(train_set.targets, len(train_set.classes), config.n_tasks, config.n, config.m,
                                   config.seed, config.stochastic)
    torch.manual_seed(config.seed)  # LoRA's random A (and adapter dropout) follow the run seed
    model = apply_peft(model, config.peft, config.encoder, **peft_arguments(config)).to(device)
    if config.compile:
        compile_towers(model, cache=not config.no_cache)
    return Setup(model, train_set, test_set, split, device, out, model_path, prompt_names, mean, std)


def run_stream(config, s):
    """Train and evaluate on the stream, writing OUT/results.json, log.jsonl, peft.pt and grad.jsonl as it goes.
    Returns the results; on an error or Ctrl-C, what was measured is kept with status "failed" or "interrupted"."""
    model, device = s.model, s.device
    image_size = model.visual.image_size
    fixed_size = config.dataset in ("cifar100", "tinyimagenet", "smoke")
    load_size = None if fixed_size else image_size  # variable-size images are fitted when loaded, so they batch
    policy = "cifar10" if config.dataset in ("cifar100", "smoke") else "imagenet"  # AutoAugment
    record = {**config._asdict(), "act": model.config.act, "model": s.model_path, "out": s.out,
              "mean": list(s.mean), "std": list(s.std)}  # the configuration and what it resolved to
    results = Results(s.out, record, s.prompt_names, s.split)
    text_features = text_feature_cache(model, s.prompt_names, config.prompt, cache=not config.no_cache)
    test_batches = stream.eval_batches(s.test_set, range(len(s.test_set)), config.eval_batch_size, config.workers,
                                       image_size=load_size, resize=config.test_resize, image_fit=config.image_fit,
                                       seed=config.seed)
    test_transform = functools.partial(stream.eval_transform, image_size=image_size, resize=config.test_resize,
                                       mean=s.mean, std=s.std)
    test = TestImages(model, test_batches, test_transform, config.eval_batch_size, cache=not config.no_cache)
    augment = stream.BatchAugment(image_size, seed=config.seed, mean=s.mean, std=s.std, per=config.augment_per)
    batches_of = functools.partial(stream.stream_batches, s.train_set, policy=policy, image_size=load_size,
                                   augment_per=config.augment_per, image_fit=config.image_fit)
    if config.peft == "none":  # zero-shot CLIP trains nothing: the labels alone, no image is read
        batches = stream.stream_labels(s.train_set, s.split.tasks, config.batch_size)
    else:
        batches = batches_of(s.split.tasks, config.batch_size, config.online_iter, workers=config.workers,
                             seed=config.seed)
    memory = None
    if config.memory_size > 0:
        load = functools.partial(batches_of, online_iter=1, workers=0)  # a memory batch, freshly augmented
        memory = ReservoirMemory(config.memory_size, config.batch_size, config.seed, load)
    peft_record = {k: record[k] for k in ("model", "act", "peft", "encoder", "prompt", "dataset", "mean", "std",
                                          "test_resize")}  # and what else rebuilds the tuned model and its inputs:
    peft_record.update(peft_args=peft_arguments(config), class_names=s.prompt_names,
                       recipe={k: getattr(config, k) for k in RECIPES[config.recipe]})  # the switches as run

    def report(event, samples, acc, per_class, seen):
        results.record(event, samples, acc, per_class, seen)
        bar.set_postfix(acc=f"{acc:.3f}", seen=len(seen), refresh=False)
        if event == "task_end" and config.peft != "none":
            save_peft(os.path.join(s.out, "peft.pt"), model, peft_record)

    def progress(samples, running_loss, seen):
        bar.update(samples - bar.n)
        if next(ticks) % config.log_every == 0:  # the only host syncs besides the evaluations
            check_finite(running_loss, samples)
            bar.set_postfix(loss=f"{running_loss.item():.3f}", seen=len(seen), refresh=False)

    ticks = itertools.count(1)
    grad_path = os.path.join(s.out, "grad.jsonl")
    start = time.time()
    with (tqdm(total=sum(map(len, s.split.tasks)), unit="img", dynamic_ncols=True, disable=config.quiet) as bar,
          open(grad_path, "w") if config.grad_analysis else contextlib.nullcontext() as grad_log):
        try:
            train(model, batches, [len(t) for t in s.split.tasks], text_features, test, augment, report,
                  config.online_iter, config.lr, config.weight_decay, config.eval_period, config.visible_classes,
                  config.double_softmax, evaluate.autocast(device, config.precision), memory, grad_log, progress)
        except BaseException as e:
            results.write(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
            raise
    results.data["config"]["wall_time_s"] = round(time.time() - start, 1)
    results.write(status="finished")
    return results.data


# ---- command line: everything checked, and fetched from the network, before any work starts --------

# Each released behaviour that changes numbers is a switch (README, "Differences from the released code").
RECIPES = {
    "ours": dict(lora_init="zero", double_softmax=False, augment_per="sample", normalize="clip",
                 test_resize="centre", class_names="readable", image_fit="centre", precision="auto",
                 eval_split="test", zero_shot_protocol="ours"),
    "released": dict(lora_init="released", double_softmax=True, augment_per="batch", normalize="dataset",
                     test_resize="squash", class_names="raw", image_fit="random", precision="fp32",
                     eval_split="train", zero_shot_protocol="released"),
}


def int_in(low, high=None):
    """An argparse type: an integer in low..high."""
    def parse(text):
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high or ''}, got {value}")
        return value
    return parse


def parse_args(argv=None):
    """The run configuration, checked and frozen (a namedtuple: nothing writes into it afterwards). Flags not given
    take their value from --scenario (N, M), --recipe (the switches) and --smoke (SMOKE_SETTINGS)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar100", choices=stream.DATASETS)
    p.add_argument("--data-root", default="data", help="where datasets are (or get downloaded)")
    p.add_argument("--model", default="ViT-B/16", help=f"one of {clip_model.available_models()} or a checkpoint path")
    p.add_argument("--act", default="auto", choices=("auto",) + clip_model.ACTIVATIONS, help="MLP activation")
    p.add_argument("--peft", default="lora", choices=("lora", "adapter", "none"), help="none = zero-shot CLIP")
    p.add_argument("--encoder", default="both", choices=clip_model.ENCODERS, help="tower(s) to tune")
    p.add_argument("--visible-classes", default="batch", choices=("batch", "all"), help="batch = SIT")
    p.add_argument("--scenario", default="si-blurry", choices=tuple(stream.SCENARIOS))
    p.add_argument("--n-tasks", type=int_in(1), default=5)
    p.add_argument("--n", type=int_in(0, 100), help="%% of classes that are disjoint (overrides --scenario)")
    p.add_argument("--m", type=int_in(0, 100), help="%% of blurry samples that are blurred (overrides --scenario)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int_in(1), default=64)
    p.add_argument("--online-iter", type=int_in(1), default=3, help="gradient steps per incoming batch")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--eval-period", type=int_in(1), default=1000, help="anytime evaluation every this many samples")
    p.add_argument("--eval-batch-size", type=int_in(1), default=256)
    p.add_argument("--memory-size", type=int_in(0), default=0, help="reservoir replay memory (0 = none, as SIT)")
    p.add_argument("--prompt", default=clip_model.PROMPT)
    p.add_argument("--lora-r", type=int_in(1), default=4)
    p.add_argument("--lora-alpha", type=float, default=1.0)
    p.add_argument("--adapter-bottleneck", type=int_in(1), default=64)
    p.add_argument("--adapter-scale", type=float, default=0.1)
    p.add_argument("--adapter-dropout", type=float, default=0.1)
    p.add_argument("--no-cache", action="store_true", help="recompute frozen towers' features (same numbers)")
    r = p.add_argument_group("recipe", "--recipe sets each switch below (ours | released); an explicit switch wins")
    r.add_argument("--recipe", default="ours", choices=tuple(RECIPES), help="released = the paper's pipeline")
    r.add_argument("--lora-init", choices=lora.INITS, help="B = 0 (zero-shot CLIP at step 0) | random q/k/v update")
    r.add_argument("--double-softmax", action=argparse.BooleanOptionalAction, help="cross-entropy on probabilities")
    r.add_argument("--augment-per", choices=stream.AUGMENT_PER, help="random draws per sample | once per batch")
    r.add_argument("--normalize", choices=("clip", "dataset"), help="the model's mean/std | the dataset's")
    r.add_argument("--test-resize", choices=stream.TEST_RESIZES, help="shorter side + centre crop | squashed")
    r.add_argument("--class-names", choices=("readable", "raw"), help="underscores become spaces | as released")
    r.add_argument("--image-fit", choices=stream.IMAGE_FITS, help="variable-size images: centre | random crop")
    r.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="auto = bf16 autocast on CUDA")
    r.add_argument("--eval-split", choices=("test", "train"), help="CIFAR-100 evaluated on test | train (a bug)")
    r.add_argument("--zero-shot-protocol", choices=("ours", "released"), help="see evaluate.py zero-shot --help")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int_in(0), default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--out", default=None, help="output folder (default: a readable name under runs/)")
    p.add_argument("--log-every", type=int_in(1), default=10, help="batches between progress-bar updates")
    p.add_argument("--compile", action="store_true", help="torch.compile the towers that run at every step")
    p.add_argument("--grad-analysis", action="store_true", help="record the text-feature gradients (Figure 2)")
    p.add_argument("--zero-shot-eval", action="store_true", help="zero-shot transfer after training")
    p.add_argument("--zero-shot-datasets", type=lambda names: tuple(names.split(",")),
                   default=",".join(evaluate.ZERO_SHOT_DATASETS))
    p.add_argument("--download-only", action="store_true", help="fetch everything this run needs, then exit")
    p.add_argument("--smoke", action="store_true", help="offline check: a tiny random CLIP learns a toy stream")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    first = p.parse_args(argv)
    if first.smoke and first.dataset != p.get_default("dataset"):
        p.error("--smoke brings its own data; leave out --dataset")
    recipe = dict(RECIPES[first.recipe])
    if first.dataset != "cifar100":  # the released evaluation on training images is a bug of its CIFAR wrapper only
        recipe["eval_split"] = "test"
    scenario = stream.SCENARIOS[first.scenario]
    p.set_defaults(**recipe, **scenario, **(SMOKE_SETTINGS if first.smoke else {}))
    args = p.parse_args(argv)  # again, with these defaults: a flag given explicitly wins over all of them
    return namedtuple("Config", vars(args))(**vars(args))


def default_out(config):
    """runs/<dataset>-<scenario>-<peft>[-<tower>-<visible>][-released]-seed<k>, never an existing folder."""
    parts = [config.dataset, config.scenario, config.peft]
    parts += [config.encoder, config.visible_classes] if config.peft != "none" else []
    parts += [config.recipe] if config.recipe != "ours" else []
    out = base = os.path.join("runs", "-".join(parts + [f"seed{config.seed}"]))
    for k in itertools.count(2):  # never overwrite an earlier run's results
        if not os.path.exists(out):
            return out
        out = f"{base}-{k}"


def download_only(config):
    """--download-only: fetch and verify what the run with these flags needs, say where it is, train nothing."""
    if config.smoke:
        print("--smoke needs nothing from the network: its model, vocabulary and images are made on the spot")
        return
    model, train_set, test_set, zero_shot = fetch(config)
    root = os.path.abspath(config.data_root)
    print(f"dataset {config.dataset}: {len(train_set)} training and {len(test_set)} test images under {root}")
    path = clip_model.checkpoint_path(config.model)  # local by now: no connection
    print(f"model {config.model}: {os.path.abspath(path)}" + (" (SHA256 verified)" if path != config.model else ""))
    if model.config.vocab_size > clip_model.BYTE_VOCAB_SIZE:  # a tokenizer with merges: it needs the BPE file
        vocab = clip_model.bpe_vocab_path()
        print(f"BPE vocabulary: {vocab}" + ("" if clip_model.is_openai_vocabulary(vocab) else " (NOT OpenAI's)"))
    for name, n in zero_shot.items():
        print(f"zero-shot {name}: {n} test images under {root}")
    print("everything this run needs is local: the same command without --download-only runs offline")


def metrics_line(d, label=None):
    """'A_auc  52.10 A_avg ... F_last      -' (percent, aligned), optionally labelled."""
    line = " ".join(f"{k} {100 * d[k]:6.2f}" if d[k] is not None else f"{k}      -" for k in evaluate.METRICS)
    return f"{line}   ({label})" if label else line


def zero_shot_eval(config, s):
    """Zero-shot transfer of the tuned model (the paper's five datasets), written to OUT/zero_shot.json as
    evaluate.py does, with the run's preprocessing and the recipe's protocol."""
    accs = evaluate.zero_shot_transfer(s.model, config.zero_shot_datasets, config.data_root, config.prompt, s.device,
                                       workers=config.workers, mean=s.mean, std=s.std, resize=config.test_resize,
                                       protocol=config.zero_shot_protocol, precision=config.precision)
    peft_weights = os.path.join(s.out, "peft.pt") if config.peft != "none" else None
    evaluate.write_zero_shot(s.out, accs, s.model_path, config.prompt, peft_weights, config.zero_shot_protocol)
    print(evaluate.zero_shot_markdown(accs))


def main(argv=None):
    config = parse_args(argv)
    try:
        if config.download_only:
            download_only(config)
            return 0
        s = setup(config)
    except (clip_model.CheckpointError, OSError, ValueError) as e:  # downloads, files, data, N/M/task counts
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(stream.describe_stream(s.split, s.train_set.targets, s.prompt_names))
    if config.smoke:
        print("--smoke: a tiny random CLIP learns a synthetic stream of gratings; its untrained self is the baseline")
    if config.eval_split == "train":
        print("evaluating on CIFAR-100's training split, as the released code did (--eval-split test: the test split)")
    print(f"writing results to {s.out}")
    try:
        results = run_stream(config, s)
    except KeyboardInterrupt:
        print(f"\ninterrupted: results so far are in {s.out}", file=sys.stderr)
        return 130
    except (NonFiniteLoss, stream.DataError) as e:  # e.g. an unreadable image met mid-stream
        message = str(e).strip().splitlines()[-1]  # a DataLoader worker wraps the error in its traceback
        print(f"error: {message}; results so far are in {s.out}", file=sys.stderr)
        return 1
    if config.smoke and config.peft != "none":
        softmax = "the batch's classes (SIT)" if config.visible_classes == "batch" else "all seen classes"
        print(metrics_line(results, f"{config.peft} on {config.encoder}, softmax over {softmax}"))
        base = config._replace(peft="none", grad_analysis=False, quiet=True, out=os.path.join(s.out, "untrained"))
        print(metrics_line(run_stream(base, setup(base)), "untrained, same stream"))
    else:
        print(metrics_line(results))
    if config.zero_shot_eval:
        try:
            zero_shot_eval(config, s)
        except stream.DataError as e:  # the lifelong results are already saved
            print(f"error: zero-shot transfer: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
