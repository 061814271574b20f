"""
Where the time goes: a benchmark of the online trainer on synthetic data of the real shapes (no download needed).

    python tests/benchmark.py                      # CPU: small fractions of each measurement
    python tests/benchmark.py --device cuda        # GPU: the full synthetic CIFAR-100 Si-Blurry run too
    python tests/benchmark.py --compile            # also the compiled step and evaluation; the run compiled

It prints (and with --json writes): the throughput of the trainer's own step (`train_online.sit_step`) with LoRA on
both / image / text towers, evaluation throughput, the released recipe's step and evaluation (fp32, the batch's
prompts on all 77 tokens at every step, test features recomputed), and the wall time of a synthetic
CIFAR-100-sized Si-Blurry run through `train_online.train` with the share spent in data loading, training and
evaluation. Not collected by pytest (no test_ prefix).
"""

import argparse
import json
import os
import resource
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_model  # noqa: E402
import lora  # noqa: E402
import stream  # noqa: E402
import train_online  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def syncs_per_call(fn):
    """Host-device synchronisations inside one call of fn, counted by CUDA's sync debug mode (it warns on each)."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def timed(fn, device, warmup, iters):
    """Seconds per call of fn, after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def vit_b16(device, encoder="both"):
    torch.manual_seed(0)
    model = clip_model.CLIP(clip_model.CLIPConfig()).eval()
    return lora.apply_lora(model, encoder=encoder).to(device) if encoder else model.requires_grad_(False).to(device)


CLASS_NAMES = [f"class number {i}" for i in range(100)]


def our_step_fn(model, device, compile_model=False, batch=64):
    """The trainer's own step (train_online.sit_step, its text cache, fused AdamW, bf16 on CUDA), CIFAR-shaped."""
    config = train_online.parse_args([])
    if compile_model:
        train_online.compile_towers(model)
    optimizer = train_online.make_optimizer(model, config.lr, config.weight_decay)
    text_features = train_online.text_features_of_classes(model, CLASS_NAMES, config.prompt)
    augment = stream.BatchAugment(model.visual.image_size, seed=0)
    amp = clip_model.autocast(device, config.precision)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)  # on the host, as the stream delivers
    images = images.pin_memory() if device.type == "cuda" else images
    labels = torch.randint(0, len(CLASS_NAMES), (batch,))
    visible = torch.unique(labels)  # the trainer's bookkeeping is on the host
    scale = model.logit_scale.exp().detach()
    return lambda: train_online.sit_step(model, optimizer, images, labels, visible, text_features, augment, scale,
                                         amp, config.double_softmax)


def encode_text_full_context(model, tokens):
    """The released recipe's text pass: all 77 positions, as OpenAI's encode_text (same features, more work)."""
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.ln_final(model.transformer(x, model.causal_mask))
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ model.text_projection


def released_step_fn(model, device, batch=64):
    """The released recipe's step, written with our modules: fp32, the batch's class prompts encoded at every step
    on all 77 tokens, AdamW as torch's default."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=1e-5)
    augment = stream.BatchAugment(model.visual.image_size, seed=0)
    tokens = clip_model.tokenize([clip_model.PROMPT.format(name) for name in CLASS_NAMES]).to(device)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, len(CLASS_NAMES), (batch,), device=device)
    scale = model.logit_scale.exp().detach()

    def step():
        visible = torch.unique(labels)
        f = F.normalize(model.encode_image(augment(images)), dim=-1)
        g = F.normalize(encode_text_full_context(model, tokens[visible]), dim=-1)
        loss = train_online.symmetric_loss(f, g, labels, visible, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def eval_fn(model, device, precision, n, batch_size):
    """The trainer's evaluation pass over n CIFAR-shaped test images, in chunks of batch_size."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    amp = clip_model.autocast(device, precision)

    @torch.inference_mode()
    def run():
        with amp():
            for chunk in images.split(batch_size):
                model.encode_image(stream.eval_transform(chunk, model.visual.image_size))
    return run


class TimedTest(train_online.TestImages):
    """The trainer's test images, timing the encoding of the evaluations' images (the tuned image tower encodes them
    at every evaluation: all of an evaluation but its text side)."""
    seconds, n_images = 0.0, 0

    def encode(self, indices):
        sync(self.images.device)
        start = time.perf_counter()
        features = super().encode(indices)
        sync(self.images.device)
        self.seconds += time.perf_counter() - start
        self.n_images += len(indices)
        return features


def timed_batches(batches, spent):
    """The stream's batches, adding the time spent waiting for each to spent["data"]."""
    start = time.perf_counter()
    for batch in batches:
        spent["data"] += time.perf_counter() - start
        yield batch
        start = time.perf_counter()


def full_run(device, fraction, workers, precision, compile_model=False):
    """A synthetic CIFAR-100-sized Si-Blurry SIT-LoRA run through the real trainer, with its time split."""
    per_class, test_per_class = max(1, int(500 * fraction)), max(1, int(100 * fraction))
    train_set = stream.SyntheticDataset(100, per_class, image_size=32, seed=0, train=True)
    test_set = stream.SyntheticDataset(100, test_per_class, image_size=32, seed=0, train=False)
    config = train_online.parse_args(["--device", device.type, "--workers", str(workers), "--precision", precision,
                                      "--eval-period", str(max(64, int(1000 * fraction)))])
    split = stream.si_blurry_split(train_set.targets, 100, config.n_tasks, config.n, config.m, config.seed,
                                   config.stochastic)
    model = vit_b16(device, config.encoder)  # apply_lora's defaults are the trainer's
    if compile_model:
        train_online.compile_towers(model)
    log = train_online.RunLog(os.path.join("runs", "benchmark"), config._asdict(), train_set.classes, split,
                              tqdm(disable=True), config.log_every)
    image_size, spent = model.visual.image_size, {"data": 0.0}
    batches = stream.stream_batches(train_set, split.tasks, config.batch_size, config.online_iter, "cifar10",
                                    config.workers, config.seed, augment_per=config.augment_per)
    sync(device)
    start = time.perf_counter()
    text_features = train_online.text_features_of_classes(model, train_set.classes, config.prompt)
    test_batches = stream.eval_batches(test_set, range(len(test_set)), config.eval_batch_size, config.workers)
    test = TimedTest(model, test_batches, lambda x: stream.eval_transform(x, image_size), config.eval_batch_size)
    augment = stream.BatchAugment(image_size, seed=config.seed, per=config.augment_per)
    train_online.train(model, timed_batches(batches, spent), task_sizes=list(map(len, split.tasks)),
                       text_features_of=text_features, test=test, augment=augment, log=log,
                       online_iter=config.online_iter, lr=config.lr, weight_decay=config.weight_decay,
                       eval_period=config.eval_period, visible_classes=config.visible_classes,
                       double_softmax=config.double_softmax, amp=clip_model.autocast(device, config.precision))
    sync(device)
    total = time.perf_counter() - start
    n_train = sum(map(len, split.tasks))
    return {"fraction": fraction, "train_images": n_train, "test_images": len(test_set),
            "evaluations": len(log.data["anytime"]) + len(log.data["task_acc"]),
            "eval_images": test.n_images, "train_image_steps": n_train * config.online_iter,
            "wall_s": total, "data_s": spent["data"], "eval_s": test.seconds,
            "train_s": total - spent["data"] - test.seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--fraction", type=float, default=None, help="of the CIFAR-100 run (default 1 on GPU, 0.01 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per measurement")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--compile", action="store_true",
                   help="also time the step and evaluation compiled (train_online.py --compile); the run is compiled")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    device = torch.device(clip_model.resolve_device(args.device))
    gpu = device.type == "cuda"
    iters = args.iters or (20 if gpu else 2)
    warmup = 5 if gpu else 1
    fraction = args.fraction if args.fraction is not None else (1.0 if gpu else 0.01)
    report = {"device": torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)",
              "torch": torch.__version__}
    print(f"# benchmark on {report['device']}, torch {torch.__version__}")

    for encoder in ("both", "image", "text"):
        step = our_step_fn(vit_b16(device, encoder), device)
        seconds = timed(step, device, warmup, iters)
        report[f"train_{encoder}_img_s"] = 64 / seconds
        syncs = ""
        if gpu:
            report[f"train_{encoder}_syncs"] = syncs_per_call(step)
            syncs = f", {report[f'train_{encoder}_syncs']} host-device syncs"
        print(f"train step, LoRA on {encoder:5s}: {64 / seconds:8.1f} images/s ({1000 * seconds:.0f} ms / batch of 64"
              f"{syncs})")
    if args.compile:
        step = our_step_fn(vit_b16(device, "both"), device, compile_model=True)
        report["compile_train_s"] = timed(step, device, 0, 1)  # the first call compiles
        seconds = timed(step, device, warmup, iters)
        report["train_both_compiled_img_s"] = 64 / seconds
        print(f"train step, LoRA on both, --compile: {64 / seconds:8.1f} images/s ({1000 * seconds:.0f} ms; "
              f"{64 / seconds / report['train_both_img_s']:.2f}x eager's speed), "
              f"compiling took {report['compile_train_s']:.0f} s")
    released = timed(released_step_fn(vit_b16(device, "both"), device), device, warmup, iters)
    report["released_train_both_img_s"] = 64 / released
    print(f"released recipe step (fp32, 77-token text): {64 / released:8.1f} images/s; "
          f"ours is {released * report['train_both_img_s'] / 64:.2f}x faster")

    n_eval = 2048 if gpu else 64
    batch_size = train_online.parse_args([]).eval_batch_size if gpu else 32  # the trainer's, on the GPU
    model = vit_b16(device, None)
    for size in (batch_size, 4 * batch_size) if gpu else (batch_size,):
        seconds = timed(eval_fn(model, device, "auto", n_eval, size), device, 1, max(1, iters // 4))
        report[f"eval_img_s_batch{size}"] = n_eval / seconds
        print(f"evaluation, batches of {size}: {n_eval / seconds:8.1f} images/s")
    report["eval_img_s"] = report[f"eval_img_s_batch{batch_size}"]
    seconds = timed(eval_fn(model, device, "fp32", n_eval, batch_size), device, 1, max(1, iters // 4))
    report["released_eval_img_s"] = n_eval / seconds
    print(f"evaluation, released recipe (fp32, batches of {batch_size}): {n_eval / seconds:8.1f} images/s; ours is "
          f"{report['eval_img_s'] * seconds / n_eval:.2f}x faster")
    if args.compile:
        model.visual.compile()
        run_eval = eval_fn(model, device, "auto", n_eval, batch_size)
        report["compile_eval_s"] = timed(run_eval, device, 0, 1)
        seconds = timed(run_eval, device, 1, max(1, iters // 4))
        report["eval_compiled_img_s"] = n_eval / seconds
        print(f"evaluation, --compile: {n_eval / seconds:8.1f} images/s ({n_eval / seconds / report['eval_img_s']:.2f}x"
              f" eager's speed), compiling took {report['compile_eval_s']:.0f} s")
    del model

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    run = full_run(device, fraction, args.workers, "auto", compile_model=args.compile)
    report["run"] = run
    print(f"synthetic CIFAR-100 Si-Blurry run{' with --compile' * args.compile} ({100 * fraction:g}% of it: "
          f"{run['train_images']} training and {run['test_images']} test images, {run['evaluations']} evaluations): "
          f"{run['wall_s']:.1f} s "
          f"= data {100 * run['data_s'] / run['wall_s']:.0f}% + training {100 * run['train_s'] / run['wall_s']:.0f}%"
          f" + evaluation {100 * run['eval_s'] / run['wall_s']:.0f}%")
    # The released recipe's run, estimated from its measured step and evaluation rates on the same counts
    # (compute only: its single-process PIL augmentation would add to it, so the ratio is conservative).
    released_s = (run["train_image_steps"] / report["released_train_both_img_s"]
                  + run["eval_images"] / report["released_eval_img_s"])
    report["released_run_estimate_s"] = released_s
    print(f"released recipe on the same run (estimated from its rates): {released_s:.1f} s; "
          f"ours is {released_s / run['wall_s']:.1f}x faster")
    if gpu:
        report["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        print(f"peak GPU memory: {report['peak_gpu_memory_gib']:.1f} GiB")
    report["peak_host_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"peak host memory: {report['peak_host_memory_gib']:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
