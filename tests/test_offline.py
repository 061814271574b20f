"""A newcomer's first hour, offline, as their machine sees it: each command runs in a child process with an empty
HOME (no ~/.cache/clip), the network switched off, and open_clip and OpenAI's clip package not importable, so the
BPE vocabulary open_clip ships (which CI installs for the parity tests) cannot be found by accident."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Put first on the child's path: sitecustomize runs at start-up and makes every connection fail (and records it);
# open_clip.py and clip.py shadow the installed packages and fail to import, as on a bare install.
SITECUSTOMIZE = """
import os
import socket

def _no_network(*args, **kwargs):
    with open(os.environ["NETWORK_LOG"], "a") as log:
        log.write(repr(args[:2]) + "\\n")
    raise OSError(101, "Network is unreachable")

socket.getaddrinfo = socket.create_connection = socket.socket.connect = socket.socket.connect_ex = _no_network
"""
HIDDEN_PACKAGE = 'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n'


@pytest.fixture
def machine(tmp_path):
    """A bare, offline machine: run(script, *args) runs one of our scripts there and returns the CompletedProcess."""
    site, home, work = tmp_path / "site", tmp_path / "home", tmp_path / "work"
    for folder in (site, home, work):
        folder.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    for name in ("open_clip", "clip"):
        (site / f"{name}.py").write_text(HIDDEN_PACKAGE.format(name=name))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLIP_BPE_PATH", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(site), NETWORK_LOG=str(tmp_path / "network.log"))

    class Machine:
        def __init__(self):
            self.home, self.work, self.network_log = home, work, tmp_path / "network.log"

        def run(self, script, *args, code=None):
            command = [sys.executable, "-c", code] if code else [sys.executable, os.path.join(ROOT, script), *args]
            command = [str(part) for part in command]
            return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)

        def connections(self):
            return self.network_log.read_text().splitlines() if self.network_log.exists() else []

        def add_vocabulary(self):
            """The BPE vocabulary where a download would put it (copied from open_clip in this, the test's, process)."""
            cache = home / ".cache" / "clip"
            cache.mkdir(parents=True, exist_ok=True)
            shutil.copy(clip_model.bpe_vocab_path(), cache / "bpe_simple_vocab_16e6.txt.gz")
    return Machine()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """What a user may have locally: an image folder (ROOT/{train,test}/<class>/*.png) and a tiny CLIP checkpoint
    in OpenAI's layout with OpenAI's vocabulary size (so its tokenizer needs the BPE file)."""
    root = tmp_path_factory.mktemp("local")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for name in ("red_fox", "cat"):
            (root / "images" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                    root / "images" / split / name / f"{i}.png")
    torch.manual_seed(0)
    torch.save(clip_model.CLIP(clip_model.TINY_CONFIG).state_dict(), root / "tiny.pt")
    return root


def one_error_line(result):
    """The child failed with exactly one line on stderr and no traceback; returns that line."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_machine_is_offline_and_bare(machine):
    result = machine.run(None, code="import socket\n"
                                    "try:\n    import open_clip\n"
                                    "except ModuleNotFoundError:\n    print('no open_clip')\n"
                                    "try:\n    socket.create_connection(('pypi.org', 443))\n"
                                    "except OSError:\n    print('no network')\n")
    assert result.stdout.split("\n")[:2] == ["no open_clip", "no network"], result.stderr
    assert len(machine.connections()) == 1
    assert not os.listdir(machine.home)


def test_smoke_runs_on_a_bare_offline_install(machine):
    result = machine.run("train_online.py", "--smoke", "--workers", "0", "--device", "cpu", "--quiet", "--out", "smoke")
    assert result.returncode == 0, result.stderr
    *_, trained, untrained = result.stdout.strip().splitlines()
    assert trained.startswith("A_auc") and untrained.endswith("(untrained, same stream)")
    for run in ("smoke", "smoke/untrained"):
        with open(machine.work / run / "results.json") as f:
            assert json.load(f)["status"] == "finished"
    assert machine.connections() == [] and not os.listdir(machine.home)


def expected_download_failure(machine, local, what):
    """(command-line arguments, words the error line must hold: what, from where, why, where to put it)."""
    images, cache = local / "images", machine.home / ".cache" / "clip"
    run = ["--dataset", "imagefolder", "--data-root", images, "--model", local / "tiny.pt", "--act", "quickgelu",
           "--n-tasks", "2"]  # the local folder's 2 classes fill 2 tasks at most
    unreachable = "Network is unreachable"
    cases = {
        "CLIP weights": (run[:4] + ["--model", "ViT-B/16", "--n-tasks", "2"],
                         ["ViT-B/16", "openaipublic.azureedge.net", unreachable, cache / "ViT-B-16.pt"]),
        "BPE vocabulary": (run, ["BPE vocabulary", "github.com/openai/CLIP", unreachable,
                                 cache / "bpe_simple_vocab_16e6.txt.gz"]),
        "CIFAR-100": (["--dataset", "cifar100", "--data-root", machine.work / "data"],
                      ["CIFAR-100", "cs.toronto.edu", unreachable, machine.work / "data" / "cifar-100-python.tar.gz"]),
        "Tiny-ImageNet": (["--dataset", "tinyimagenet", "--data-root", machine.work / "data"],
                          ["Tiny-ImageNet", "cs231n.stanford.edu", unreachable,
                           machine.work / "data" / "tiny-imagenet-200.zip"]),
        "ImageNet-R": (["--dataset", "imagenet-r", "--data-root", machine.work / "data"],
                       ["ImageNet-R", "berkeley.edu", unreachable, machine.work / "data" / "imagenet-r.tar"]),
        "zero-shot dataset": (run + ["--zero-shot-eval", "--zero-shot-datasets", "food101"],
                              ["food101", "food-101.tar.gz", unreachable, images / "food-101.tar.gz"]),
        "zero-shot dataset after --smoke": (["--smoke", "--zero-shot-eval", "--zero-shot-datasets", "food101"],
                                            ["food101", unreachable, "put it at data/food-101.tar.gz"]),
    }
    return cases[what]


@pytest.mark.parametrize("what", ["CLIP weights", "BPE vocabulary", "CIFAR-100", "Tiny-ImageNet", "ImageNet-R",
                                  "zero-shot dataset", "zero-shot dataset after --smoke"])
def test_a_download_that_cannot_happen_is_one_clear_line_before_any_run_folder(machine, local, what):
    if what == "zero-shot dataset":
        machine.add_vocabulary()  # so that the zero-shot dataset is the only thing missing
    args, words = expected_download_failure(machine, local, what)
    line = one_error_line(machine.run("train_online.py", *args, "--out", "run", "--workers", "0"))
    assert line.startswith("error: could not download"), line
    for word in words:
        assert str(word) in line, (word, line)
    assert machine.connections(), "it must have tried the network"
    assert not (machine.work / "run").exists() and not (machine.work / "runs").exists()


@pytest.mark.parametrize("dataset, source, put_at", [
    ("food101", "data.vision.ee.ethz.ch", "food-101.tar.gz"), ("caltech101", "data.caltech.edu", "caltech101"),
    ("eurosat", "huggingface.co", "eurosat"), ("flowers102", "robots.ox.ac.uk", "flowers-102"),
    ("oxford_pets", "robots.ox.ac.uk", "oxford-iiit-pet")])
def test_evaluate_zero_shot_download_failures_are_one_clear_line(machine, local, dataset, source, put_at):
    machine.add_vocabulary()
    data = machine.work / "data"
    line = one_error_line(machine.run("evaluate.py", "zero-shot", "--model", local / "tiny.pt", "--act", "quickgelu",
                                      "--datasets", dataset, "--data-root", data, "--workers", "0"))
    assert line.startswith(f"evaluate.py zero-shot: error: could not download {dataset} from"), line
    for word in (source, "Network is unreachable", data / put_at):
        assert str(word) in line, (word, line)
    assert not (machine.work / "runs").exists()  # no zero_shot.json: nothing was measured


def test_download_only_prepares_a_run_that_then_needs_no_network(machine, local):
    machine.add_vocabulary()  # what --download-only would have fetched; this machine has no network to fetch it
    args = ["--dataset", "imagefolder", "--data-root", local / "images", "--model", local / "tiny.pt",
            "--zero-shot-eval", "--zero-shot-datasets", "imagefolder", "--n-tasks", "2", "--workers", "0",
            "--device", "cpu"]
    prepared = machine.run("train_online.py", *args, "--download-only", "--out", "run")
    assert prepared.returncode == 0, prepared.stderr
    assert str(machine.home / ".cache" / "clip" / "bpe_simple_vocab_16e6.txt.gz") in prepared.stdout
    assert str(local / "tiny.pt") in prepared.stdout and "runs offline" in prepared.stdout
    assert not (machine.work / "run").exists() and not (machine.work / "runs").exists()  # nothing trained
    ran = machine.run("train_online.py", *args, "--quiet", "--out", "run")
    assert ran.returncode == 0, ran.stderr
    with open(machine.work / "run" / "results.json") as f:
        assert json.load(f)["status"] == "finished"
    assert (machine.work / "run" / "zero_shot.json").exists()
    assert machine.connections() == []  # neither command opened a connection
