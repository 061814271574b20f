"""
Online lifelong tuning of CLIP with Symmetric Image-Text (SIT) tuning, on a Si-Blurry stream.

    python train_online.py --dataset cifar100                 # SIT-LoRA on both towers, released defaults
    python train_online.py --dataset cifar100 --visible-classes all   # the asymmetric baseline
    python train_online.py --dataset cifar100 --recipe released      # the pipeline the paper's numbers came from
    python train_online.py --dataset cifar100 --download-only        # fetch everything, then run offline
    python train_online.py --smoke                            # offline check: a tiny random CLIP learns, < 1 min on CPU

One plain loop, top to bottom: the loss (symmetric_loss), the feature caches that frozen towers allow,
the anytime / task-end evaluation, the results that are written as they are measured, and `train`.
"""

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapter
import clip_model
import evaluate
import lora
import stream

# -----------------------------------------------------------------------------
# the loss


def visible_classes(labels, seen, mode):
    """The classes the softmax runs over: SIT's C_B (distinct labels in the batch) or every seen class."""
    return torch.unique(labels) if mode == "batch" else seen


def symmetric_loss(image_features, text_features, labels, visible, logit_scale, double_softmax=False):
    """L = mean_i CE(s * <f_i, g_c> over c in `visible`, y_i): SIT when `visible` = C_B, the classes in the batch.

    image_features (B, D) and text_features (len(visible), D) are L2-normalised; row j of text_features
    belongs to class visible[j]; every label must be in `visible`.
    """
    logits = logit_scale * image_features @ text_features.t()  # (B, V)
    targets = (labels[:, None] == visible[None, :]).int().argmax(dim=1)  # position of y_i in `visible`
    if double_softmax:  # the released code's quirk: its model returns probabilities and CE softmaxes again
        logits = logits.softmax(dim=-1)
    return F.cross_entropy(logits.float(), targets)


def text_gradient_parts(image_features, text_features, labels, visible, logit_scale):
    """The positive and negative parts of dL/dg_c, each (V, D), for the visible classes (the paper's Figure 2).

    dL/dg_c = (s/|B|) sum_i (p_ic - [y_i = c]) f_i: the positive part sums over the samples of class c, the
    negative part over all other samples. Closed form for the cross-entropy on logits.
    """
    f = image_features.detach().float()
    p = (logit_scale * f @ text_features.detach().float().t()).softmax(dim=-1)  # (B, V)
    y = (labels[:, None] == visible[None, :]).float()  # (B, V) one-hot over the visible classes
    scale = float(logit_scale) / len(labels)
    return scale * (y * (p - 1)).t() @ f, scale * ((1 - y) * p).t() @ f


# -----------------------------------------------------------------------------
# features, with the caches that frozen towers allow


class TextFeatures:
    """Normalised text features g_c by class id; computed once per class when the text tower is frozen."""

    def __init__(self, model, class_names, prompt, trainable, cache=True):
        self.model = model
        self.trainable = trainable
        self.use_cache = cache and not trainable
        tokens = clip_model.tokenize([prompt.format(name) for name in class_names], model.config.context_length,
                                     vocab_size=model.config.vocab_size)
        self.device = model.positional_embedding.device
        self.tokens = clip_model.trim_padding(tokens).to(self.device)
        self.cache = torch.zeros(len(class_names), model.config.embed_dim, device=self.device)
        self.cached = torch.zeros(len(class_names), dtype=torch.bool)  # bookkeeping on the host: no device syncs

    def __call__(self, classes):
        """(len(classes), D) features of these class ids (a CPU tensor); with grad when the text tower trains."""
        if not self.use_cache:
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                tokens = self.tokens[classes.to(self.device, non_blocking=True)]
                return F.normalize(self.model.encode_text(tokens), dim=-1)
        missing = classes[~self.cached[classes]]
        if len(missing):  # a class seen for the first time: encode it once, for training and evaluation alike
            with torch.no_grad():
                rows = missing.to(self.device, non_blocking=True)
                self.cache[rows] = F.normalize(self.model.encode_text(self.tokens[rows]), dim=-1).float()
            self.cached[missing] = True
        return self.cache[classes.to(self.device, non_blocking=True)]


class TestImages:
    """The test split as one uint8 tensor on the device, and its image features (cached if the tower is frozen)."""

    def __init__(self, model, batches, transform, trainable, batch_size, device, cache=True):
        self.model = model
        self.transform = transform  # uint8 (N, 3, H, W) -> the normalised model input
        self.use_cache = cache and not trainable
        self.batch_size = batch_size
        batches = list(batches)
        self.images = torch.cat([images for images, _ in batches]).to(device)  # (N, 3, H, W) uint8
        self.targets = torch.cat([labels for _, labels in batches])  # on the host, for choosing test samples
        self.labels = self.targets.to(device)
        self.cache = torch.zeros(len(self.labels), model.config.embed_dim, device=device)
        self.cached = torch.zeros(len(self.labels), dtype=torch.bool, device=device)

    @torch.inference_mode()
    def encode(self, indices):
        return torch.cat([F.normalize(self.model.encode_image(self.transform(self.images[chunk])), dim=-1).float()
                          for chunk in indices.split(self.batch_size)])

    def features(self, indices):
        """(len(indices), D) normalised image features of these test samples."""
        if not self.use_cache:
            return self.encode(indices)
        missing = indices[~self.cached[indices]]
        if len(missing):  # the frozen image tower encodes each test image once in the whole run
            self.cache[missing] = self.encode(missing)
            self.cached[missing] = True
        return self.cache[indices]


def evaluate_seen(test, text_features, seen, num_classes, amp):
    """Top-1 accuracy on the test images of the seen classes, predicting among the seen classes only."""
    device = test.labels.device
    indices = stream.seen_test_indices(test.targets, seen).to(device)
    with torch.inference_mode(), amp():
        g_seen = text_features(seen).float()
        g = g_seen.new_zeros(num_classes, g_seen.shape[1])  # rows indexed by class id; unseen rows never win
        g[seen.to(device)] = g_seen
        f = test.features(indices)
    return evaluate.top1_on_seen(f, test.labels[indices], g, seen.tolist())


# -----------------------------------------------------------------------------
# results that survive: written atomically as they are measured


class Results:
    """results.json (rewritten after every evaluation) and log.jsonl (appended as it happens)."""

    def __init__(self, out, config, class_names, split):
        os.makedirs(out, exist_ok=True)
        self.out = out
        self.data = {"config": config, "status": "running", "class_names": list(class_names),
                     "seen_classes": [], "disjoint_classes": split["disjoint"], "blurry_classes": split["blurry"],
                     "anytime": [], "task_end_samples": [], "task_acc": [], "class_acc": [],
                     "A_auc": None, "A_avg": None, "A_last": None, "F_last": None}
        open(os.path.join(out, "log.jsonl"), "w").close()
        self.write()

    def log(self, record):
        with open(os.path.join(self.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def anytime(self, samples, acc, seen):
        self.data["anytime"].append({"samples": samples, "acc": acc})
        self.log({"event": "anytime", "samples": samples, "acc": acc, "n_seen": len(seen)})
        self.write(seen)

    def task_end(self, task, samples, acc, per_class, seen):
        row = [per_class.get(c) for c in range(len(self.data["class_names"]))]
        self.data["task_end_samples"].append(samples)
        self.data["task_acc"].append(acc)
        self.data["class_acc"].append(row)
        self.log({"event": "task_end", "task": task, "samples": samples, "acc": acc, "n_seen": len(seen),
                  "class_acc": {str(c): a for c, a in per_class.items()}})
        self.write(seen)

    def write(self, seen=None, status=None):
        d = self.data
        if seen is not None:
            d["seen_classes"] = list(seen)
        if status is not None:
            d["status"] = status
        d.update(evaluate.lifelong_metrics([a["acc"] for a in d["anytime"]], d["task_acc"], d["class_acc"]))
        evaluate.write_json(os.path.join(self.out, "results.json"), d)


def save_peft(path, model, args, class_names):
    """OUT/peft.pt: the trained LoRA/adapter tensors and everything needed to rebuild the tuned model and the
    preprocessing it was tuned with."""
    state_dict = lora.lora_state_dict(model) if args.peft == "lora" else adapter.adapter_state_dict(model)
    tmp = path + ".tmp"
    torch.save({"model": args.model, "act": args.act, "peft": args.peft, "encoder": args.encoder,
                "peft_args": peft_arguments(args), "state_dict": {k: v.cpu() for k, v in state_dict.items()},
                "prompt": args.prompt, "dataset": args.dataset, "class_names": list(class_names),
                "mean": list(args.mean), "std": list(args.std), "test_resize": args.test_resize,
                "recipe": {k: getattr(args, k) for k in RECIPES[args.recipe]}}, tmp)
    os.replace(tmp, path)


def peft_arguments(args):
    """The keyword arguments of apply_lora / apply_adapter this run used (saved in peft.pt)."""
    if args.peft == "lora":
        return {"r": args.lora_r, "alpha": args.lora_alpha, "targets": list(lora.TARGETS), "init": args.lora_init}
    return {"bottleneck": args.adapter_bottleneck, "scale": args.adapter_scale, "dropout": args.adapter_dropout}


# -----------------------------------------------------------------------------
# replay memory (optional; SIT itself uses none)


class ReservoirMemory:
    """Reservoir sampling over the stream, as the released code's optional replay memory."""

    def __init__(self, size, seed):
        self.size = size
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

    def sample(self, k):
        picks = torch.randperm(len(self.indices), generator=self.generator)[:k]
        return [self.indices[i] for i in picks.tolist()]


# -----------------------------------------------------------------------------
# the online loop




class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the run stops and keeps what it measured before."""


def make_optimizer(model, lr, weight_decay):
    """AdamW over the PEFT parameters, re-created at every task start as in the released code."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].is_cuda  # one kernel for the whole update on the GPU; same arithmetic
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def tuned_towers(args):
    """The towers whose LoRA/adapter parameters train: a subset of {"image", "text"}."""
    if args.peft == "none":
        return set()
    return {"image", "text"} if args.encoder == "both" else {args.encoder}


def apply_peft(model, args):
    """LoRA or adapters on the chosen tower(s); everything else frozen. --peft none: nothing trains."""
    if args.peft == "lora":
        lora.apply_lora(model, encoder=args.encoder, r=args.lora_r, alpha=args.lora_alpha, init=args.lora_init)
    elif args.peft == "adapter":
        adapter.apply_adapter(model, encoder=args.encoder, bottleneck=args.adapter_bottleneck,
                              scale=args.adapter_scale, dropout=args.adapter_dropout)
    else:
        model.requires_grad_(False)
    return model


def sit_step(model, optimizer, images, labels, visible, text_features, augment, logit_scale, amp,
             tunes_image=True, double_softmax=False):
    """One gradient step on one augmented copy of the batch; returns the loss and the features it used.

    images: uint8 (B, 3, H, W); augment: uint8 batch -> model input; text_features: class ids -> (V, D) features
    (with grad when the text tower trains); visible: the class ids of the softmax, every label among them."""
    device = logit_scale.device
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    with amp():
        x = augment(images)  # resize, padded random crop, flip, normalise: batched, on the device
        with torch.set_grad_enabled(tunes_image):
            f = F.normalize(model.encode_image(x), dim=-1)
        g = text_features(visible)
        loss = symmetric_loss(f, g, labels, visible.to(device, non_blocking=True), logit_scale, double_softmax)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), f.detach(), g.detach()


def label_batches(targets, tasks, batch_size):
    """The stream's batches without their images, for --peft none (nothing trains, so nothing is augmented)."""
    for t, indices in stream.task_batches(tasks, batch_size):  # the batches of stream.stream_batches
        yield stream.StreamBatch(t, None, torch.tensor([targets[i] for i in indices]), torch.tensor(indices))


def train(args, model, train_set, test_set, split, results, device):
    """The online protocol: each batch is seen once, new classes become seen (and trainable) on arrival,
    `online_iter` steps per batch with fresh augmentation, anytime and task-end evaluation."""
    num_classes = len(train_set.classes)
    trains = args.peft != "none"
    tunes_image = "image" in tuned_towers(args)
    amp = autocast_context(device, args.precision)
    n_px = model.visual.input_resolution
    text_features = TextFeatures(model, args.prompt_names, args.prompt, trainable="text" in tuned_towers(args),
                                 cache=not args.no_cache)
    test_batches = stream.eval_batches(test_set, range(len(test_set)), args.eval_batch_size, args.workers,
                                       size=args.image_size, resize=args.test_resize, image_fit=args.image_fit,
                                       seed=args.seed)
    test_transform = functools.partial(stream.eval_transform, n_px=n_px, resize=args.test_resize, mean=args.mean,
                                       std=args.std)
    test = TestImages(model, test_batches, test_transform, tunes_image, args.eval_batch_size, device,
                      cache=not args.no_cache)
    augment = stream.BatchAugment(n_px, seed=args.seed, mean=args.mean, std=args.std, per=args.augment_per)
    memory = ReservoirMemory(args.memory_size, args.seed) if args.memory_size > 0 else None
    logit_scale = model.logit_scale.exp().detach()  # s, frozen
    if trains:
        batches = stream.stream_batches(train_set, split.tasks, args.batch_size, args.online_iter, args.policy,
                                        args.workers, args.seed, size=args.image_size, augment_per=args.augment_per,
                                        image_fit=args.image_fit)
    else:
        batches = label_batches(train_set.targets, split.tasks, args.batch_size)
    grad_log = open(os.path.join(args.out, "grad.jsonl"), "w") if args.grad_analysis else None
    bar = tqdm(total=sum(map(len, split.tasks)), unit="img", dynamic_ncols=True, disable=args.quiet)

    seen = torch.zeros(0, dtype=torch.long)  # class ids in order of first appearance (on the host)
    task_ends = torch.tensor([len(t) for t in split.tasks]).cumsum(0).tolist()
    # Leading empty tasks (the random cuts can leave a task without classes) end before any class is seen:
    # there is nothing to evaluate, so they get no task-end entry. (The released code fails on them.)
    n_task_ends = sum(1 for end in task_ends if end == 0)
    samples, next_eval, step, task, optimizer = 0, args.eval_period, 0, -1, None
    running_loss, last_acc = torch.zeros((), device=device), None
    for n_batches, batch in enumerate(batches, start=1):
        if batch.task != task and trains:  # a new task: the released code re-creates the optimizer here
            optimizer = make_optimizer(model, args.lr, args.weight_decay)
        task = batch.task
        known = set(seen.tolist())
        new = [c for c in dict.fromkeys(batch.labels.tolist()) if c not in known]
        seen = torch.cat([seen, torch.tensor(new, dtype=torch.long)])  # seen, and trainable in this same batch

        for it in range(args.online_iter if trains else 0):
            images, labels = batch.images[it], batch.labels
            if memory is not None and memory.indices:
                images, labels = with_memory_batch(images, labels, memory, train_set, args, step)
            # with replay, as released, the loss runs over all seen classes
            visible = visible_classes(labels, seen, "all" if memory is not None else args.visible_classes)
            model.train()
            loss, f, g = sit_step(model, optimizer, images, labels, visible, text_features, augment,
                                  logit_scale, amp, tunes_image, args.double_softmax)
            model.eval()
            if grad_log is not None:
                log_gradient_parts(grad_log, f, g, labels.to(device), visible.to(device), logit_scale, step,
                                   samples, task)
            # a running mean kept on the device: no host sync per step, and a NaN in it stays there
            running_loss = loss if step == 0 else 0.9 * running_loss + 0.1 * loss
            step += 1
        if memory is not None:  # after training on the batch, as the released ER
            memory.add(batch.indices.tolist())
        samples += len(batch.labels)
        bar.update(len(batch.labels))

        if samples > next_eval:  # anytime evaluation, as released: when the counter passes the next point
            next_eval += args.eval_period
            check_finite(running_loss, samples)
            last_acc, _ = evaluate_seen(test, text_features, seen, num_classes, amp)
            results.anytime(samples, last_acc, seen.tolist())
        while n_task_ends < len(task_ends) and task_ends[n_task_ends] <= samples:  # (empty tasks end together)
            check_finite(running_loss, samples)
            last_acc, per_class = evaluate_seen(test, text_features, seen, num_classes, amp)
            results.task_end(n_task_ends, samples, last_acc, per_class, seen.tolist())
            n_task_ends += 1
            if trains:
                save_peft(os.path.join(args.out, "peft.pt"), model, args, args.prompt_names)
        if n_batches % args.log_every == 0:  # the only host syncs besides the evaluations
            check_finite(running_loss, samples)
            bar.set_postfix(loss=f"{running_loss.item():.3f}", seen=len(seen),
                            acc="-" if last_acc is None else f"{last_acc:.3f}", refresh=False)
    bar.close()
    if grad_log is not None:
        grad_log.close()
    return model


def with_memory_batch(images, labels, memory, train_set, args, step):
    """Stream batch + a memory batch of half its size, freshly augmented (the released replay)."""
    picks = memory.sample(max(1, args.batch_size // 2))
    (mem,) = stream.stream_batches(train_set, [picks], len(picks), 1, args.policy, workers=0,
                                   seed=args.seed * 1_000_003 + step, size=args.image_size,
                                   augment_per=args.augment_per, image_fit=args.image_fit)
    return torch.cat([images, mem.images[0]]), torch.cat([labels, mem.labels])


def log_gradient_parts(log, f, g, labels, visible, logit_scale, step, samples, task):
    """One line of OUT/grad.jsonl: per visible class, the positive and negative gradient on its text feature."""
    positive, negative = text_gradient_parts(f, g, labels, visible, logit_scale)
    in_batch = torch.isin(visible, labels)
    log.write(json.dumps({"step": step, "samples": samples, "task": task, "classes": visible.tolist(),
                          "in_batch": in_batch.tolist(), "pos": positive.norm(dim=-1).tolist(),
                          "neg": negative.norm(dim=-1).tolist()}) + "\n")


def check_finite(running_loss, samples):
    """Stop the run with a clear message once the (device-side) running loss is NaN or inf."""
    if not torch.isfinite(running_loss):
        raise NonFiniteLoss(f"the loss became non-finite (NaN or inf) before sample {samples}; "
                            "try a lower --lr or --precision fp32")


def autocast_context(device, precision):
    """bf16 autocast on CUDA by default (--precision auto), plain fp32 elsewhere."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


# -----------------------------------------------------------------------------
# command line: everything is checked, and everything that needs the network fetched, before any work starts

# --recipe: each behaviour of the released code that changes numbers is a switch of its own (README, "Where we
# deliberately differ from the released code"); a recipe sets them all, an explicit flag overrides it.
RECIPES = {
    "ours": dict(lora_init="zero", double_softmax=False, augment_per="sample", normalize="clip", test_resize="clip",
                 class_names="readable", image_fit="centre", precision="auto"),
    "released": dict(lora_init="released", double_softmax=True, augment_per="batch", normalize="dataset",
                     test_resize="squash", class_names="raw", image_fit="random", precision="fp32"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar100", choices=stream.DATASETS)
    p.add_argument("--data-root", default="data", help="where datasets are (or get downloaded)")
    p.add_argument("--model", default="ViT-B/16", help=f"one of {clip_model.available_models()} or a checkpoint path")
    p.add_argument("--act", default="auto", choices=("auto",) + clip_model.ACTIVATIONS,
                   help="MLP activation of --model: auto = open_clip_config.json beside it, else OpenAI's QuickGELU")
    p.add_argument("--peft", default="lora", choices=("lora", "adapter", "none"), help="none = zero-shot CLIP")
    p.add_argument("--encoder", default="both", choices=("image", "text", "both"), help="tower(s) to tune")
    p.add_argument("--visible-classes", default="batch", choices=("batch", "all"),
                   help="softmax over the classes in the batch (SIT) or over all seen classes")
    p.add_argument("--scenario", default="si-blurry", choices=tuple(stream.SCENARIOS))
    p.add_argument("--n-tasks", type=int, default=5)
    p.add_argument("--n", type=int, default=None, help="%% of classes that are disjoint (overrides --scenario)")
    p.add_argument("--m", type=int, default=None, help="%% of blurry samples that are blurred (overrides --scenario)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--online-iter", type=int, default=3, help="gradient steps per incoming batch")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--eval-period", type=int, default=1000, help="anytime evaluation every this many samples")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--memory-size", type=int, default=0, help="reservoir replay memory (0 = none, as SIT)")
    p.add_argument("--prompt", default=clip_model.PROMPT)
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=1.0)
    p.add_argument("--adapter-bottleneck", type=int, default=64)
    p.add_argument("--adapter-scale", type=float, default=0.1)
    p.add_argument("--adapter-dropout", type=float, default=0.1)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute frozen-tower features every time (the released recipe; same numbers, slower)")
    r = p.add_argument_group("recipe", "--recipe sets each of the switches below; a switch given explicitly wins")
    r.add_argument("--recipe", default="ours", choices=tuple(RECIPES),
                   help="released = every released behaviour that changes numbers (the paper's pipeline)")
    r.add_argument("--lora-init", choices=lora.INITS, help="zero: B = 0 (starts at zero-shot CLIP); released: "
                                                           "random q/k/v update")
    r.add_argument("--double-softmax", action=argparse.BooleanOptionalAction,
                   help="the released loss: cross-entropy on softmax probabilities")
    r.add_argument("--augment-per", choices=stream.AUGMENT_PER,
                   help="AutoAugment, crop and flip drawn per sample, or once per batch (released)")
    r.add_argument("--normalize", choices=("clip", "dataset"),
                   help="the model's mean/std (CLIP's, or an open_clip config's), or the dataset's (released)")
    r.add_argument("--test-resize", choices=clip_model.TEST_RESIZES,
                   help="test images: shorter side + centre crop (clip), or squashed to n x n (released)")
    r.add_argument("--class-names", choices=("readable", "raw"),
                   help="prompt names: underscores become spaces, or the names the released code used")
    r.add_argument("--image-fit", choices=stream.IMAGE_FITS,
                   help="variable-size images (ImageNet-R, folders): centre crop, or Resize(8/7 n) + RandomCrop(n) "
                        "once per image (released)")
    r.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="auto = bf16 autocast on CUDA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--out", default=None, help="output folder (default: a readable name under runs/)")
    p.add_argument("--log-every", type=int, default=10, help="batches between progress-bar updates")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the towers that run at every step (in place: parameter names unchanged)")
    p.add_argument("--grad-analysis", action="store_true", help="record the text-feature gradients (Figure 2)")
    p.add_argument("--zero-shot-eval", action="store_true", help="zero-shot transfer after training")
    p.add_argument("--zero-shot-datasets", default=",".join(evaluate.ZERO_SHOT_DATASETS),
                   help="comma-separated, for --zero-shot-eval (found or downloaded under --data-root)")
    p.add_argument("--download-only", action="store_true",
                   help="fetch and verify everything this run needs (weights, vocabulary, data), then exit")
    p.add_argument("--smoke", action="store_true",
                   help="offline check: a tiny random CLIP learns a synthetic stream, beside its untrained baseline")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    scenario = stream.SCENARIOS[args.scenario]
    args.n = scenario["n"] if args.n is None else args.n
    args.m = scenario["m"] if args.m is None else args.m
    args.stochastic = scenario["stochastic"]
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_args(args):
    """User errors that argparse cannot see, named before any work starts."""
    for name in ("n", "m"):
        if not 0 <= getattr(args, name) <= 100:
            raise ValueError(f"--{name} must be a percentage in 0..100, got {getattr(args, name)}")
    for name in ("n_tasks", "batch_size", "online_iter", "eval_period", "eval_batch_size", "log_every", "lora_r"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("memory_size", "workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.zero_shot_eval:
        evaluate.check_zero_shot_names(args.zero_shot_datasets.split(","))


def default_out(args):
    """runs/<dataset>-<scenario>-<peft>-<tower>-<visible>[-released]-seed<k>, never an existing folder."""
    name = f"{args.dataset}-{args.scenario}-{args.peft}"
    if args.peft != "none":
        name += f"-{args.encoder}-{args.visible_classes}"
    if args.recipe != "ours":
        name += f"-{args.recipe}"
    base = os.path.join("runs", f"{name}-seed{args.seed}")
    out, k = base, 1
    while os.path.exists(out):  # never overwrite an earlier run's results
        k += 1
        out = f"{base}-{k}"
    return out


# The --smoke world: a tiny random CLIP in OpenAI's layout (4 heads of width 16, byte-level vocabulary, so no
# vocabulary file and no network), and a stream of 10 grating classes it can learn (stream.SyntheticDataset).
SMOKE_CONFIG = replace(clip_model.TINY_CONFIG, vocab_size=clip_model.BYTE_VOCAB_SIZE, vision_heads=4,
                       transformer_heads=4)
# Chosen so that learning shows in seconds on a CPU: 1,000 training images in 2 tasks, batches of 16, a learning
# rate 20x the released one. (tests/test_train_online.py checks the lift over the untrained model on 3 seeds.)
SMOKE_SETTINGS = dict(batch_size=16, lr=1e-2, n_tasks=2, eval_period=100)


def smoke_setup(args):
    """--smoke: the tiny random CLIP (saved, so that peft.pt can rebuild the tuned model) and the grating stream."""
    torch.manual_seed(0)
    model = clip_model.CLIP(SMOKE_CONFIG).eval()
    os.makedirs(args.out, exist_ok=True)
    args.model = os.path.join(args.out, "smoke_clip.pt")
    torch.save(model.state_dict(), args.model)
    train_set = stream.SyntheticDataset(num_classes=10, per_class=100, image_size=32, seed=0, train=True)
    test_set = stream.SyntheticDataset(num_classes=10, per_class=20, image_size=32, seed=0, train=False)
    return model, train_set, test_set


def compile_towers(model, args):
    """--compile: torch.compile, in place, each tower that runs at every step (a tuned one, or any with --no-cache)."""
    # A frozen tower behind its cache runs once per class or test image: compiling it would cost more than it saves.
    tuned = tuned_towers(args)
    if args.no_cache or "image" in tuned:
        model.visual.compile()
    if args.no_cache or "text" in tuned:
        model.transformer.compile()


def fetch(args):
    """The datasets, the CLIP checkpoint, its tokenizer's vocabulary and the zero-shot datasets: downloaded (and
    verified) where missing, so that nothing after this needs the network.
    Returns (model, train_set, test_set, {zero-shot dataset: number of images})."""
    train_set = stream.load_dataset(args.dataset, args.data_root, train=True)  # before the model: a bad data
    test_set = stream.load_dataset(args.dataset, args.data_root, train=False)  # root fails before a download
    model = clip_model.load(args.model, act=None if args.act == "auto" else args.act)
    clip_model.get_tokenizer(model.config.vocab_size)  # OpenAI's BPE vocabulary: found, or downloaded now
    zero_shot = {}
    if args.zero_shot_eval:
        zero_shot = evaluate.fetch_zero_shot(args.zero_shot_datasets.split(","), args.data_root)
    return model, train_set, test_set, zero_shot


def normalization(args, model, train_set):
    """The mean and std images are normalised with: the model's own, or the training set's (released)."""
    if args.normalize == "clip":
        return model.config.image_mean, model.config.image_std
    if args.dataset in stream.DATASET_STATS:
        return stream.DATASET_STATS[args.dataset]
    return stream.channel_stats(train_set)  # an image folder or the smoke data: measured


def setup(args):
    """Model, data and stream, or a clear error before any training starts (and before any run folder exists,
    except --smoke's, which saves its tiny model there)."""
    check_args(args)
    device = torch.device(evaluate.resolve_device(args.device))  # --device cuda without a GPU: a clear error
    if args.smoke:
        args.dataset = "smoke"
        for name, value in SMOKE_SETTINGS.items():
            setattr(args, name, value)
        args.out = args.out or default_out(args)
        model, train_set, test_set = smoke_setup(args)
    else:
        model, train_set, test_set, _ = fetch(args)
    if list(train_set.classes) != list(test_set.classes):
        raise stream.DataError(f"{args.data_root}: train and test splits have different classes")
    args.act = model.config.act  # what auto resolved to, for results.json and peft.pt
    args.prompt_names = list(train_set.raw_classes if args.class_names == "raw" else train_set.classes)
    args.mean, args.std = normalization(args, model, train_set)
    args.policy = "cifar10" if args.dataset in ("cifar100", "smoke") else "imagenet"  # AutoAugment policy
    fixed_size = args.dataset in ("cifar100", "tinyimagenet", "smoke")
    args.image_size = None if fixed_size else model.visual.input_resolution  # variable-size images get fitted
    split = stream.si_blurry_split(train_set.targets, len(train_set.classes), args.n_tasks, args.n, args.m,
                                   args.seed, args.stochastic)
    torch.manual_seed(args.seed)  # LoRA's random A (and adapter dropout) follow the run seed
    model = apply_peft(model, args).to(device)
    if args.compile:
        compile_towers(model, args)
    args.out = args.out or default_out(args)
    return model, train_set, test_set, split, device


def download_only(args):
    """--download-only: fetch and verify what the run with these flags needs, say where it is, train nothing."""
    check_args(args)
    if args.smoke:
        print("--smoke needs nothing from the network: its model, vocabulary and images are made on the spot")
        return
    model, train_set, test_set, zero_shot = fetch(args)
    print(f"dataset {args.dataset}: {len(train_set)} training and {len(test_set)} test images under "
          f"{os.path.abspath(args.data_root)}")
    path = clip_model.checkpoint_path(args.model)  # local by now: no connection
    print(f"model {args.model}: {os.path.abspath(path)}" + (" (SHA256 verified)" if path != args.model else ""))
    if model.config.vocab_size > clip_model.BYTE_VOCAB_SIZE:  # a tokenizer with merges: it needs the BPE file
        vocab = clip_model.bpe_vocab_path()
        verified = "SHA256 verified" if clip_model.is_openai_vocabulary(vocab) else "NOT OpenAI's: its SHA256 differs"
        print(f"BPE vocabulary: {vocab} ({verified})")
    for name, n in zero_shot.items():
        print(f"zero-shot {name}: {n} test images under {os.path.abspath(args.data_root)}")
    print("everything this run needs is local: the same command without --download-only runs offline")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.download_only:
            download_only(args)
            return 0
        model, train_set, test_set, split, device = setup(args)
    except (clip_model.CheckpointError, clip_model.DownloadError, stream.DataError, ValueError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(stream.describe_stream(split, train_set.targets, args.prompt_names))
    if args.smoke:
        print("--smoke: a tiny random CLIP learns a synthetic stream of gratings; its untrained self is the baseline")
    results = Results(args.out, dict(vars(args)), args.prompt_names,
                      {"disjoint": split.disjoint_classes, "blurry": split.blurry_classes})
    print(f"writing results to {args.out}")
    start = time.time()
    try:
        train(args, model, train_set, test_set, split, results, device)
    except KeyboardInterrupt:
        results.write(status="interrupted")
        print(f"\ninterrupted: results so far are in {args.out}", file=sys.stderr)
        return 130
    except (NonFiniteLoss, stream.DataError) as e:  # e.g. an unreadable image met mid-stream
        results.write(status="failed")
        message = str(e).strip().splitlines()[-1]  # a DataLoader worker wraps the error in its traceback
        print(f"error: {message}; results so far are in {args.out}", file=sys.stderr)
        return 1
    except BaseException:
        results.write(status="failed")
        raise
    results.data["config"]["wall_time_s"] = round(time.time() - start, 1)
    results.write(status="finished")
    if args.smoke and args.peft != "none":
        print(metrics_line(results.data, tuned_name(args)))
        print(metrics_line(smoke_baseline(args, train_set, test_set, split, device), "untrained, same stream"))
    else:
        print(metrics_line(results.data))
    if args.zero_shot_eval:
        try:
            zero_shot_eval(args, model, device)
        except evaluate.EvaluationError as e:  # the lifelong results are already saved
            print(f"error: zero-shot transfer: {e}", file=sys.stderr)
            return 1
    return 0


def metrics_line(d, label=None):
    """'A_auc  52.10 A_avg ... F_last      -' (percent, aligned), optionally labelled."""
    line = " ".join(f"{k} {100 * d[k]:6.2f}" if d[k] is not None else f"{k}      -" for k in evaluate.METRICS)
    return f"{line}   ({label})" if label else line


def tuned_name(args):
    """'SIT-LoRA on both towers', 'adapter on the text tower, softmax over all seen classes'."""
    name = ("SIT-" if args.visible_classes == "batch" else "") + {"lora": "LoRA", "adapter": "adapter"}[args.peft]
    towers = "both towers" if args.encoder == "both" else f"the {args.encoder} tower"
    return f"{name} on {towers}" + (", softmax over all seen classes" if args.visible_classes == "all" else "")


def smoke_baseline(args, train_set, test_set, split, device):
    """--smoke: the same stream with --peft none (the untrained tiny CLIP), written to OUT/untrained."""
    base = argparse.Namespace(**{**vars(args), "peft": "none", "grad_analysis": False, "quiet": True,
                                 "out": os.path.join(args.out, "untrained")})
    torch.manual_seed(0)
    model = apply_peft(clip_model.CLIP(SMOKE_CONFIG).eval(), base).to(device)
    results = Results(base.out, dict(vars(base)), base.prompt_names,
                      {"disjoint": split.disjoint_classes, "blurry": split.blurry_classes})
    train(base, model, train_set, test_set, split, results, device)
    results.write(status="finished")
    return results.data


def zero_shot_eval(args, model, device):
    """Zero-shot transfer of the tuned model (the paper's five datasets), written to OUT/zero_shot.json as
    evaluate.py does, with the run's preprocessing."""
    accs = evaluate.zero_shot_transfer(model, args.zero_shot_datasets.split(","), args.data_root, args.prompt,
                                       device, workers=args.workers, mean=args.mean, std=args.std,
                                       resize=args.test_resize)
    peft_weights = os.path.join(args.out, "peft.pt") if args.peft != "none" else None
    evaluate.write_zero_shot(args.out, accs, args.model, args.prompt, peft_weights)
    print(evaluate.zero_shot_markdown(accs))


if __name__ == "__main__":
    sys.exit(main())
