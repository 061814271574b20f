"""The online trainer: the SIT property of the loss, end-to-end runs that write their results, clean errors."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import evaluate
import lora
import stream
import train_online
from train_online import symmetric_loss, text_gradient_parts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = clip_model.TINY_CONFIG


# -----------------------------------------------------------------------------
# the loss


def features(seed=0, B=6, C=5, D=8):
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    return f, text


def text_gradient(softmax_over):
    """dL/dg for the text features of 5 seen classes, with a batch holding classes 0, 2 and 3 only."""
    f, text = features()
    text.requires_grad_(True)
    labels = torch.tensor([0, 2, 2, 3, 0, 3])
    seen = torch.tensor([3, 0, 4, 2, 1])  # order of first appearance
    visible = labels.unique() if softmax_over == "batch" else seen  # as train_online.train chooses C_B
    symmetric_loss(f, text[visible], labels, visible, scale=torch.tensor(100.0)).backward()
    return text.grad


def test_sit_gives_absent_seen_classes_exactly_zero_gradient():
    grad = text_gradient("batch")
    assert torch.all(grad[[1, 4]] == 0)  # seen classes 1 and 4 are absent from the batch
    assert torch.all(grad[[0, 2, 3]].norm(dim=-1) > 0)


def test_all_seen_classes_loss_pushes_absent_classes():
    grad = text_gradient("all")
    assert torch.all(grad[[1, 4]].norm(dim=-1) > 0)


def test_loss_is_cross_entropy_over_visible_classes():
    f, text = features()
    labels = torch.tensor([4, 1, 1, 4, 4, 1])
    visible = torch.tensor([1, 4])
    logits = 100 * f @ text[visible].t()
    expected = F.cross_entropy(logits, torch.tensor([1, 0, 0, 1, 1, 0]))
    loss = symmetric_loss(f, text[visible], labels, visible, torch.tensor(100.0))
    torch.testing.assert_close(loss, expected)


def test_double_softmax_is_cross_entropy_on_probabilities_as_released():
    f, text = features()
    labels, visible = torch.tensor([4, 1, 1, 4, 4, 1]), torch.tensor([1, 4])
    probabilities = (100 * f @ text[visible].t()).softmax(dim=-1)
    expected = F.cross_entropy(probabilities, torch.tensor([1, 0, 0, 1, 1, 0]))
    loss = symmetric_loss(f, text[visible], labels, visible, torch.tensor(100.0), double_softmax=True)
    torch.testing.assert_close(loss, expected)


def test_loss_refuses_a_label_that_is_not_visible():
    f, text = features()
    labels, visible = torch.tensor([4, 1, 1, 3, 4, 1]), torch.tensor([1, 4])
    with pytest.raises(ValueError, match=r"labels \[3\] are not among the visible classes \[1, 4\]"):
        symmetric_loss(f, text[visible], labels, visible, scale=torch.tensor(100.0))


@pytest.mark.parametrize("double_softmax", [False, True])
def test_gradient_parts_sum_to_the_autograd_gradient_of_the_loss_trained(double_softmax):
    f, text = features()
    labels = torch.tensor([0, 2, 2, 3, 0, 3])
    visible = torch.tensor([3, 0, 4, 2, 1])
    g = text[visible].clone().requires_grad_(True)
    symmetric_loss(f, g, labels, visible, torch.tensor(100.0), double_softmax).backward()
    positive, negative = text_gradient_parts(f, g, labels, visible, torch.tensor(100.0), double_softmax)
    torch.testing.assert_close(positive + negative, g.grad)
    # the parts are those of this loss: the other loss's closed form gives another gradient
    other = sum(text_gradient_parts(f, g, labels, visible, torch.tensor(100.0), not double_softmax))
    assert not torch.allclose(other, g.grad)
    absent = ~torch.isin(visible, labels)
    assert torch.all(positive[absent] == 0) and torch.all(negative[absent].norm(dim=-1) > 0)


# -----------------------------------------------------------------------------
# end-to-end runs on a generated image folder and a tiny checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ROOT/{train,test}/<class>/*.png for 4 classes, and a tiny random CLIP checkpoint in OpenAI's layout."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (4, 3))
    for split, n in (("train", 24), ("test", 5)):
        for c, name in enumerate(["red_fox", "blue whale", "cat", "dog"]):
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(colours[c] + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    torch.save(clip_model.CLIP(TINY).state_dict(), root / "tiny.pt")
    return root


def run_args(data, out, *extra):
    return ["--dataset", "imagefolder", "--data-root", str(data / "images"), "--model", str(data / "tiny.pt"),
            "--n-tasks", "2", "--batch-size", "8", "--eval-period", "20", "--workers", "0", "--device", "cpu",
            "--out", str(out), "--quiet", *extra]


def read(out, name="results.json"):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def test_end_to_end_run_writes_all_outputs(data, tmp_path):
    assert train_online.main(run_args(data, tmp_path / "run")) == 0
    results = read(tmp_path / "run")
    assert results["status"] == "finished"
    assert len(results["task_acc"]) == 2 and len(results["anytime"]) == 96 // 20
    assert all(0 <= results[k] <= 1 for k in ("A_auc", "A_avg", "A_last"))
    assert sorted(results["seen_classes"]) == [0, 1, 2, 3]
    assert results["class_names"] == ["blue whale", "cat", "dog", "red fox"]
    assert results["config"]["visible_classes"] == "batch"
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [e["event"] for e in log].count("task_end") == 2
    peft = torch.load(tmp_path / "run" / "peft.pt", weights_only=True)
    assert peft["peft"] == "lora" and all("lora" in k for k in peft["state_dict"])


def test_zero_shot_eval_after_training_matches_evaluate_py(data, tmp_path):
    out = tmp_path / "zs"
    assert train_online.main(run_args(data, out, "--zero-shot-eval", "--zero-shot-datasets", "imagefolder")) == 0
    after_training = read(out, "zero_shot.json")["accuracy"]["imagefolder"]
    model, prompt = evaluate.load_peft_model(str(out / "peft.pt"))
    accs = evaluate.zero_shot_transfer(model, ["imagefolder"], str(data / "images"), prompt, "cpu", workers=0)
    assert accs["imagefolder"] == after_training


def test_same_seed_gives_identical_metrics(data, tmp_path):
    for name in ("a", "b"):
        assert train_online.main(run_args(data, tmp_path / name, "--seed", "3")) == 0
    a, b = read(tmp_path / "a"), read(tmp_path / "b")
    assert a["anytime"] == b["anytime"] and a["class_acc"] == b["class_acc"]


def test_feature_caches_do_not_change_the_numbers(data, tmp_path):
    for encoder in ("image", "text"):  # the other tower is frozen, so its features are cached
        runs = []
        for cache in ("", "--no-cache"):
            out = tmp_path / f"{encoder}{cache}"
            assert train_online.main(run_args(data, out, "--encoder", encoder, *([cache] if cache else []))) == 0
            runs.append(read(out))
        assert runs[0]["anytime"] == runs[1]["anytime"] and runs[0]["class_acc"] == runs[1]["class_acc"]


@pytest.mark.parametrize("peft, encoder, no_cache, compiled", [
    ("lora", "both", False, {"image", "text"}), ("lora", "image", False, {"image"}),
    ("adapter", "text", False, {"text"}), ("none", "both", False, set()), ("lora", "image", True, {"image", "text"})])
def test_compile_only_the_towers_that_run_at_every_step(peft, encoder, no_cache, compiled):
    model = train_online.apply_peft(clip_model.CLIP(TINY), peft, encoder)
    train_online.compile_towers(model, cache=not no_cache)  # lazy: nothing is compiled before the first call
    towers = {"image": model.visual, "text": model.transformer}
    assert {name for name, tower in towers.items() if tower._compiled_call_impl is not None} == compiled


def test_compiled_towers_give_the_same_features_and_gradients():
    torch.manual_seed(0)
    eager = lora.apply_lora(clip_model.CLIP(TINY).eval(), encoder="both")
    for module in lora.lora_modules(eager):  # B = 0 at the start would leave the low-rank path untested
        torch.nn.init.normal_(module.lora_B, std=0.1)
    compiled = copy.deepcopy(eager)
    train_online.compile_towers(compiled)
    assert compiled.visual._compiled_call_impl is not None and compiled.transformer._compiled_call_impl is not None
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = clip_model.trim_padding(clip_model.tokenize([f"a bad photo of a {c}." for c in "abc"]))
    labels, visible = torch.tensor([0, 2, 2, 1]), torch.tensor([0, 1, 2])
    outputs = []
    for model in (eager, compiled):
        f = F.normalize(model.encode_image(images), dim=-1)
        g = F.normalize(model.encode_text(tokens), dim=-1)
        symmetric_loss(f, g, labels, visible, model.logit_scale.exp().detach()).backward()
        outputs.append([f, g] + [p.grad for p in model.parameters() if p.requires_grad])
    assert len(outputs[1]) == 2 + 4 * (TINY.vision_layers + TINY.transformer_layers)  # A, B of in_proj, out_proj
    assert all(t is not None for t in outputs[1])
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_zero_shot_baseline_encodes_each_test_image_once(data, tmp_path, monkeypatch):
    encoded = []
    original = train_online.TestImages.encode
    monkeypatch.setattr(train_online.TestImages, "encode",
                        lambda self, indices: encoded.extend(indices.tolist()) or original(self, indices))
    assert train_online.main(run_args(data, tmp_path / "zs", "--peft", "none")) == 0
    assert sorted(encoded) == list(range(20))
    assert not os.path.exists(tmp_path / "zs" / "peft.pt")


def interrupt_at_call(monkeypatch, owner, name, n):
    """Make owner.name raise KeyboardInterrupt at its n-th call."""
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize("when, owner, name, n", [
    ("start-up", clip_model, "load", 1), ("loading", stream, "eval_batches", 1), ("training", train_online, "sit_step", 5),
    ("evaluation", evaluate, "evaluate_seen", 3), ("writing", stream, "write_file", 2)])
def test_ctrl_c_at_any_point_ends_the_run_interrupted_with_exit_130(data, tmp_path, monkeypatch, capsys, when, owner,
                                                                    name, n):
    interrupt_at_call(monkeypatch, owner, name, n)
    assert train_online.main(run_args(data, tmp_path / "int")) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    if when == "start-up":
        assert not os.path.exists(tmp_path / "int")  # nothing was made
    else:
        assert read(tmp_path / "int")["status"] == "interrupted"
    if when == "evaluation":  # what was measured before stays: 3 records, the 2nd evaluation at 48 samples
        # served an anytime point and the first task end together
        assert len(read(tmp_path / "int")["anytime"]) + len(read(tmp_path / "int")["task_acc"]) == 3
        assert len(open(tmp_path / "int" / "log.jsonl").readlines()) == 3


def test_ctrl_c_that_python_swallows_at_a_fork_still_interrupts(data, tmp_path):
    # A Ctrl-C that lands in an after-fork handler (as DataLoader workers start) is discarded by Python
    # ("Exception ignored in: <function _releaseLock ...>"); here such a handler raises it at the first fork.
    # Ctrl-C is made deliverable first: a background job (pytest ... &) starts with SIGINT ignored.
    code = ("import os, signal, sys\nimport train_online\nfired = []\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "def interrupt_once():\n    if not fired:\n        fired.append(1)\n        raise KeyboardInterrupt\n"
            "os.register_at_fork(after_in_parent=interrupt_once)\nsys.exit(train_online.main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", code, *run_args(data, tmp_path / "fork", "--workers", "1")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert read(tmp_path / "fork")["status"] == "interrupted"


def test_any_error_mid_run_leaves_the_results_failed(data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(train_online, "sit_step", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train_online.main(run_args(data, tmp_path / "bug"))
    assert read(tmp_path / "bug")["status"] == "failed"


def test_non_finite_loss_stops_with_a_clear_message(data, tmp_path, monkeypatch, capsys):
    original = train_online.symmetric_loss
    monkeypatch.setattr(train_online, "symmetric_loss", lambda *a, **k: original(*a, **k) * float("nan"))
    assert train_online.main(run_args(data, tmp_path / "nan")) == 1
    assert "non-finite" in capsys.readouterr().err
    assert read(tmp_path / "nan")["status"] == "failed"


@pytest.mark.parametrize("split, workers", [("train", "1"), ("test", "0"), ("test", "2")])
def test_unreadable_image_mid_run_fails_the_run_naming_the_file(data, tmp_path, capsys, split, workers):
    root = tmp_path / "images"
    shutil.copytree(data / "images", root)
    (root / split / "cat" / "3.png").write_bytes(b"not a png")
    args = run_args(data, tmp_path / "broken", "--workers", workers)
    args[args.index("--data-root") + 1] = str(root)
    assert train_online.main(args) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: cannot read image") and "3.png" in line and "DataError" not in line, line
    assert read(tmp_path / "broken")["status"] == "failed"


def test_grad_analysis_records_only_batch_classes_under_sit(data, tmp_path):
    for mode in ("batch", "all"):
        out = tmp_path / mode
        assert train_online.main(run_args(data, out, "--grad-analysis", "--visible-classes", mode)) == 0
        records = [json.loads(line) for line in open(out / "grad.jsonl")]
        assert len(records) == 3 * 12  # online_iter steps on each of the 12 batches
        absent = [(p, n) for r in records for p, n, b in zip(r["pos"], r["neg"], r["in_batch"]) if not b]
        if mode == "batch":
            assert absent == []
        else:
            assert absent and all(p == 0 and n > 0 for p, n in absent)


def replay_steps(data, out, monkeypatch, *flags):
    """(labels, visible) of every gradient step of a run with a replay memory (stream batches of 8)."""
    steps = []
    step = train_online.RunLog.step
    monkeypatch.setattr(train_online.RunLog, "step", lambda log, loss, f, g, labels, visible, *rest: (
        steps.append((labels.clone(), visible.clone())), step(log, loss, f, g, labels, visible, *rest)))
    assert train_online.main(run_args(data, out, "--memory-size", "16", *flags)) == 0
    monkeypatch.undo()
    return steps


def test_with_replay_sits_c_b_holds_the_memory_batch_labels_and_all_every_seen_class(data, tmp_path, monkeypatch):
    sit = replay_steps(data, tmp_path / "sit", monkeypatch)
    assert all(torch.equal(visible, labels.unique()) for labels, visible in sit)  # C_B: the batch with its memory
    assert any(not set(labels[8:].tolist()) <= set(labels[:8].tolist()) for labels, _ in sit)  # memory adds classes
    every = replay_steps(data, tmp_path / "all", monkeypatch, "--visible-classes", "all")
    assert [labels.tolist() for labels, _ in every] == [labels.tolist() for labels, _ in sit]  # the same batches
    assert any(len(a) != len(b) for (_, a), (_, b) in zip(sit, every))  # another softmax: another loss
    assert read(tmp_path / "sit")["config"]["visible_classes"] == "batch"
    released = replay_steps(data, tmp_path / "released", monkeypatch, "--replay-classes", "seen")
    assert [v.tolist() for _, v in released] == [v.tolist() for _, v in every]  # the released replay is "all"


# -----------------------------------------------------------------------------
# it learns: on the --smoke stream (10 classes of grey gratings, 2 tasks, batches of 16, lr 1e-2: see
# train_online.SMOKE_SETTINGS), a tiny random CLIP tuned with SIT beats its untrained self clearly


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sit_lifts_accuracy_far_above_the_untrained_model(tmp_path, seed):
    # Measured on seeds 1-5 the smallest lift is 19.5 points of A_auc (LoRA on the text tower, seed 4); we ask for 15.
    for peft, encoder in (("lora", "image"), ("lora", "text"), ("lora", "both"), ("adapter", "both")):
        out = tmp_path / f"{peft}-{encoder}"
        assert train_online.main(["--smoke", "--seed", str(seed), "--peft", peft, "--encoder", encoder,
                                  "--workers", "0", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
        trained, untrained = read(out), read(out / "untrained")  # --smoke runs the untrained model beside
        assert untrained["config"]["peft"] == "none"
        assert [a["samples"] for a in untrained["anytime"]] == [a["samples"] for a in trained["anytime"]]
        for metric in ("A_auc", "A_last"):
            assert trained[metric] >= untrained[metric] + 0.15, (peft, encoder, metric, trained[metric],
                                                                 untrained[metric])


RELEASED = dict(lora_init="released", double_softmax=True, augment_per="batch", normalize="dataset",
                test_resize="squash", class_names="raw", image_fit="random", precision="fp32", eval_split="test",
                zero_shot_protocol="released", replay_classes="seen")  # eval_split "train" is CIFAR-100's alone


def test_recipe_released_sets_every_switch_and_an_explicit_flag_wins():
    args = train_online.parse_args(["--recipe", "released"])
    assert {k: getattr(args, k) for k in RELEASED} == {**RELEASED, "eval_split": "train"}  # CIFAR-100
    args = train_online.parse_args(["--recipe", "released", "--no-double-softmax", "--augment-per", "sample"])
    assert (args.double_softmax, args.augment_per, args.lora_init) == (False, "sample", "released")
    ours = train_online.parse_args([])
    assert (ours.lora_init, ours.double_softmax, ours.normalize, ours.class_names) == ("zero", False, "clip",
                                                                                      "readable")


def test_an_explicit_flag_wins_over_the_smoke_defaults(tmp_path):
    config = train_online.parse_args(["--smoke", "--lr", "0.003", "--n-tasks", "3"])
    assert (config.lr, config.n_tasks, config.batch_size) == (0.003, 3, train_online.SMOKE_SETTINGS["batch_size"])
    out = tmp_path / "smoke"
    assert train_online.main(["--smoke", "--lr", "0.003", "--batch-size", "32", "--eval-period", "500",
                              "--peft", "none", "--workers", "0", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    recorded = read(out)["config"]
    assert (recorded["lr"], recorded["batch_size"], recorded["eval_period"]) == (0.003, 32, 500)


@pytest.mark.parametrize("recipe, dataset, split", [("ours", "cifar100", "test"), ("released", "cifar100", "train"),
                                                    ("released", "tinyimagenet", "test")])
def test_cifar100_is_evaluated_on_its_training_split_only_under_the_released_recipe(recipe, dataset, split,
                                                                                   monkeypatch):
    config = train_online.parse_args(["--recipe", recipe, "--dataset", dataset])
    assert config.eval_split == split
    loaded = []

    def load_dataset(name, root, train):
        loaded.append(train)
        if len(loaded) == 2:
            raise stream.DataError("enough: only the splits asked for are checked here")

    monkeypatch.setattr(stream, "load_dataset", load_dataset)
    with pytest.raises(stream.DataError):
        train_online.fetch(config)
    assert loaded == [True, split == "train"]  # the stream's split, then the evaluation's


def test_recipe_released_runs_end_to_end_and_records_its_switches(data, tmp_path):
    out = tmp_path / "released"
    assert train_online.main(run_args(data, out, "--recipe", "released", "--act", "quickgelu")) == 0
    results = read(out)
    assert results["status"] == "finished"
    assert {k: results["config"][k] for k in RELEASED} == RELEASED and results["config"]["recipe"] == "released"
    assert results["class_names"] == ["blue whale", "cat", "dog", "red_fox"]  # the folders' names, as prompted
    assert results["config"]["act"] == "quickgelu"
    images = stream.load_dataset("imagefolder", str(data / "images"), train=True)
    assert tuple(results["config"]["mean"]) == stream.channel_stats(images)[0]  # the image folder's own statistics
    saved = torch.load(out / "peft.pt", weights_only=True)
    assert saved["recipe"] == RELEASED and saved["peft_args"]["init"] == "released"
    assert saved["test_resize"] == "squash" and saved["mean"] == results["config"]["mean"]
    model, _ = evaluate.load_peft_model(str(out / "peft.pt"))
    assert list(model.config.image_mean) == saved["mean"] and model.config.act == "quickgelu"


def test_an_open_clip_checkpoint_trains_and_rebuilds_with_its_activation_and_mean_std(data, tmp_path):
    folder = tmp_path / "open_clip"  # the tiny checkpoint with the config open_clip's hubs put beside weights
    folder.mkdir()
    shutil.copy(data / "tiny.pt", folder / "tiny.pt")
    vision = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8}  # TINY_CONFIG, no quick_gelu: GELU
    config = {"model_cfg": {"embed_dim": 32, "vision_cfg": vision, "text_cfg": {"width": 64, "heads": 1, "layers": 2}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    args = run_args(data, out)
    args[args.index("--model") + 1] = str(folder / "tiny.pt")
    assert train_online.main(args) == 0
    results = read(out)
    assert results["config"]["act"] == "gelu" and results["config"]["mean"] == [0.5, 0.5, 0.5]
    model, _ = evaluate.load_peft_model(str(out / "peft.pt"))
    assert model.config.act == "gelu" and isinstance(model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert model.config.image_std == (0.25, 0.25, 0.25)


def test_raw_class_names_go_into_the_prompts(data, tmp_path, monkeypatch):
    prompts = []
    original = clip_model.tokenize
    monkeypatch.setattr(clip_model, "tokenize",
                        lambda texts, *a, **k: prompts.extend(texts) or original(texts, *a, **k))
    assert train_online.main(run_args(data, tmp_path / "raw", "--class-names", "raw", "--peft", "none")) == 0
    assert "a bad photo of a red_fox." in prompts and "a bad photo of a red fox." not in prompts


def cli(*args):
    return subprocess.run([sys.executable, "train_online.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("case", ["unknown dataset", "missing checkpoint", "corrupt checkpoint", "n > 100",
                                  "m < 0", "zero tasks", "empty data root", "cuda without gpu", "prompt without {}",
                                  "lr beyond float32"])
def test_bad_input_exits_cleanly(data, tmp_path, case):
    args = run_args(data, tmp_path / "bad")
    (tmp_path / "bad.pt").write_bytes(os.urandom(1000))
    (tmp_path / "empty").mkdir()
    edits = {"unknown dataset": ("--dataset", "mnist"), "missing checkpoint": ("--model", str(tmp_path / "no.pt")),
             "corrupt checkpoint": ("--model", str(tmp_path / "bad.pt")), "n > 100": ("--n", "150"),
             "m < 0": ("--m", "-1"),
             "zero tasks": ("--n-tasks", "0"), "empty data root": ("--data-root", str(tmp_path / "empty")),
             "cuda without gpu": ("--device", "cuda"), "prompt without {}": ("--prompt", "hello"),
             "lr beyond float32": ("--lr", "1e300")}
    if case == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    flag, value = edits[case]
    args = args + [flag, value]  # argparse keeps the last value given
    result = cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(("error:", "usage:", "train_online.py: error:"))
    assert not os.path.exists(tmp_path / "bad")  # nothing started


@pytest.mark.parametrize("flag, value", [("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"),
                                         ("--lr", "1e300"), ("--lora-alpha", "1e39"), ("--prompt", "hello"),
                                         ("--prompt", "{1}"),
                                         ("--prompt", "{} {}"), ("--prompt", "{!r}"), ("--prompt", "{:>9}"),
                                         ("--weight-decay", "-1e-5"), ("--lora-alpha", "nan"), ("--seed", "-1"),
                                         ("--adapter-dropout", "1.5"), ("--batch-size", "0"), ("--workers", "two")])
def test_a_bad_number_or_prompt_is_refused_by_the_usage_line_and_one_error_line(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_online.parse_args(["--smoke", f"{flag}={value}"])
    assert exit_.value.code == 2
    usage, error = capsys.readouterr().err.strip().splitlines()
    assert usage.startswith("usage: ") and f": error: argument {flag}: expected" in error
    assert error.endswith(f"got {value}")


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        train_online.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "AdamW's (default: 0.0005)" in text and "(default: ViT-B/16)" in text


def one_class(data, tmp_path):
    for split in ("train", "test"):
        shutil.copytree(data / "images" / split / "cat", tmp_path / "one" / split / "cat")
    return str(tmp_path / "one")


def long_class_name(data, tmp_path):
    shutil.copytree(data / "images", tmp_path / "long")
    for split in ("train", "test"):
        os.rename(tmp_path / "long" / split / "cat", tmp_path / "long" / split / ("cat" * 70))
    return str(tmp_path / "long")


@pytest.mark.parametrize("case", ["--out below a file", "one class", "more tasks than classes", "smoke tasks",
                                  "class name too long"])
def test_a_refused_run_is_one_line_exit_2_and_leaves_no_folder(data, tmp_path, capsys, case):
    (tmp_path / "file").write_text("")
    out = tmp_path / "run"
    args, words = {
        "--out below a file": (run_args(data, tmp_path / "file" / "run"), ["--out", "file"]),
        "class name too long": (run_args(data, out, "--data-root", long_class_name(data, tmp_path), "--act",
                                         "quickgelu"), ["cat" * 70, "is 78 tokens, longer than context length 77"]),
        "one class": (run_args(data, out, "--data-root", one_class(data, tmp_path)), ["--data-root", "1 class"]),
        "more tasks than classes": (run_args(data, out, "--n-tasks", "5"), ["--n-tasks 5", "at most 4"]),
        "smoke tasks": (["--smoke", "--n-tasks", "1000", "--quiet", "--out", str(out)], ["--n-tasks 1000"]),
    }[case]
    assert train_online.main(args) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and all(word in line for word in words), line
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["file", "long", "one"]


def test_a_leading_empty_task_gets_no_task_end(data, tmp_path):
    # seed 21 cuts the image folder's stream into tasks of 0 and 96 samples
    assert train_online.main(run_args(data, tmp_path / "empty", "--seed", "21")) == 0
    assert read(tmp_path / "empty")["task_end_samples"] == [96]


# -----------------------------------------------------------------------------
# runs on a cluster: one run per folder, a finished run kept, SIGTERM and a full disk end clean


def start(*args, code="import sys, train_online\nsys.exit(train_online.main(sys.argv[1:]))"):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(process):
    """(exit status, last line of stderr) of a started run."""
    _, err = process.communicate(timeout=300)
    assert "Traceback" not in err, err
    return process.returncode, err.strip().rpartition("\n")[2]


def files(out):
    return sorted(os.path.relpath(os.path.join(root, f), out) for root, _, names in os.walk(out) for f in names)


def wait_for_evaluations(out, n=2):
    """Until log.jsonl holds n evaluations: the run is training."""
    for _ in range(6000):
        if os.path.exists(out / "log.jsonl") and len(open(out / "log.jsonl").readlines()) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(out)


SMOKE = ("--smoke", "--quiet", "--workers", "0", "--eval-period", "50")


def test_a_finished_run_is_never_overwritten_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_online.main([*SMOKE, "--peft", "none", "--out", str(out)]) == 0
    before = {f: (out / f).read_bytes() for f in files(out)}
    capsys.readouterr()
    assert train_online.main([*SMOKE, "--peft", "none", "--seed", "2", "--out", str(out)]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert "finished run" in line and "--overwrite" in line and "--skip-finished" in line, line
    assert {f: (out / f).read_bytes() for f in files(out)} == before  # untouched
    assert train_online.main([*SMOKE, "--peft", "none", "--seed", "2", "--out", str(out), "--overwrite"]) == 0
    assert read(out)["config"]["seed"] == 2


def test_an_unfinished_runs_folder_is_started_afresh_with_only_the_new_runs_files(tmp_path):
    out = tmp_path / "run"
    (out / "untrained").mkdir(parents=True)
    for name in ("peft.pt", "grad.jsonl", "zero_shot.json", "results.json.tmp", "untrained/results.json"):
        (out / name).write_text("an earlier run's")
    (out / "log.jsonl").write_text('{"event": "anytime", "samples": 1}\n' * 7)
    (out / "results.json").write_text(json.dumps({"status": "failed"}))
    assert finished(start(*SMOKE, "--peft", "none", "--out", out))[0] == 0
    assert files(out) == ["log.jsonl", "results.json", "run.lock", "smoke_clip.pt"]
    results = read(out)
    assert len(open(out / "log.jsonl").readlines()) == len(results["anytime"]) + len(results["task_acc"])


def test_the_grids_slurm_script_ends_a_finished_task_at_once_without_harm(tmp_path, capsys):
    out, _ = evaluate.grid_runs("cifar100", runs_root=str(tmp_path))[0]
    os.makedirs(out)
    results = os.path.join(out, "results.json")
    evaluate.write_json(results, {"status": "finished", "A_last": 0.5})
    assert evaluate.main(["grid", "--runs-root", str(tmp_path), "--slurm"]) == 0
    (tmp_path / "grid.sbatch").write_text(capsys.readouterr().out)
    result = subprocess.run(["bash", tmp_path / "grid.sbatch"], env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "holds a finished run" in result.stderr.strip().splitlines()[-1]
    assert os.listdir(out) == ["results.json"] and read(out) == {"status": "finished", "A_last": 0.5}


def test_a_second_run_into_a_live_runs_folder_is_refused_and_the_first_is_untouched(tmp_path):
    out = tmp_path / "run"
    first = start(*SMOKE, "--out", out)
    wait_for_evaluations(out, 1)
    code, line = finished(start(*SMOKE, "--seed", "2", "--out", out))
    assert code == 2 and line == f"error: --out {out}: another run is writing to it; use another --out"
    assert finished(first)[0] == 0
    results = read(out)
    assert results["status"] == "finished" and results["config"]["seed"] == 1
    assert len(open(out / "log.jsonl").readlines()) == len(results["anytime"]) + len(results["task_acc"])


def test_sigterm_ends_the_run_interrupted_with_exit_143_keeping_what_was_measured(tmp_path):
    out = tmp_path / "run"
    run = start(*SMOKE, "--out", out)
    wait_for_evaluations(out)
    run.send_signal(signal.SIGTERM)
    assert finished(run) == (143, "interrupted (SIGTERM)")
    results = read(out)
    assert results["status"] == "interrupted" and len(results["anytime"]) >= 2
    assert not any(f.endswith(".tmp") for f in files(out))


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    out = tmp_path / "run"
    run = start(*SMOKE, "--out", out)
    wait_for_evaluations(out)
    run.kill()
    run.wait()
    assert read(out)["status"] == "running" and os.path.exists(out / "run.lock")
    assert finished(start(*SMOKE, "--peft", "none", "--out", out))[0] == 0
    assert files(out) == ["log.jsonl", "results.json", "run.lock", "smoke_clip.pt"]


FULL_DISK = ("import resource, signal, sys, train_online\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG): a full disk\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0}))\n"
             "sys.exit(train_online.main(sys.argv[1:]))")


@pytest.mark.parametrize("fails, limit, code, flags", [
    ("smoke_clip.pt", 100_000, 2, SMOKE), ("results.json", 2000, 1, ("--peft", "none")),
    ("grad.jsonl", 3000, 1, ("--grad-analysis", "--n-tasks", "1")), ("peft.pt", 10_000, 1, ())])
def test_a_full_disk_ends_the_run_in_one_line_leaving_only_complete_files(data, tmp_path, fails, limit, code, flags):
    out = tmp_path / "run"
    args = [*flags, "--out", out] if fails == "smoke_clip.pt" else run_args(data, out, *flags)
    result, line = finished(start(*args, code=FULL_DISK.format(limit)))
    assert result == code and line.startswith("error: [Errno 27] File too large: ") and fails in line, line
    assert not any(f.endswith(".tmp") for f in files(out))
    for name in files(out):  # each file whole: JSON that parses, a torch file that loads
        if name.endswith(".json"):
            read(out, name)
        if name.endswith(".jsonl"):
            [json.loads(line) for line in open(out / name)]
        if name.endswith(".pt"):
            torch.load(out / name, weights_only=True)


def test_a_line_or_file_that_does_not_fit_is_taken_back_whole(tmp_path):
    code = FULL_DISK.format(110).split("sys.exit")[0] + (
        "import evaluate, os\n"
        "log = train_online.JsonLines(sys.argv[1], 'w')\n"
        "try:\n    while True: log.write('{\"twenty bytes\": 1}\\n')\n"
        "except OSError as e: print(e.filename)\n"
        "evaluate.write_json(sys.argv[2], [1])\n"
        "try: evaluate.write_json(sys.argv[2], list(range(100)))\n"
        "except OSError as e: print(e.filename)\n")
    log, results = tmp_path / "log.jsonl", tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-c", code, log, results], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split() == [str(log), str(results)], result.stderr
    assert log.read_text() == '{"twenty bytes": 1}\n' * 5 and json.loads(results.read_text()) == [1]
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", "results.json"]  # no .tmp
