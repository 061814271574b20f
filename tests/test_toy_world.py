"""The premise of tests/toy_study.py on one world: the world is deterministic and in the paper's
regime, a CLIP pretrained on it transfers zero-shot, and the stream's images sit below the clean
ones. Nothing here asserts who wins."""

import collections
import os
from dataclasses import replace

import pytest
import torch
from PIL import Image

import toy_study
import toy_world


def folder_bytes(root):
    """{relative path: file bytes} of every file under root."""
    files = {}
    for parent, _, names in os.walk(root):
        for name in names:
            path = os.path.join(parent, name)
            files[os.path.relpath(path, root)] = open(path, "rb").read()
    return files


@pytest.mark.parametrize("world", [0, 1, 100])
def test_groups_split_the_compositions_and_each_holds_every_shape_and_texture(world):
    groups = {g: toy_world.classes(g, world) for g in toy_world.GROUPS}
    assert sum(map(len, groups.values())) == len(set().union(*groups.values())) == 64
    for group in groups.values():
        for k in (0, 1):  # texture, shape
            counts = collections.Counter(comp[k] for comp in group)
            assert len(counts) == 8 and len(set(counts.values())) == 1  # each word equally often


def test_the_regime_is_the_papers():
    """At least 24 stream classes in 4 Si-Blurry tasks (N 50, M 10) and 8 held-out ones; a training
    batch of 64 holds several classes (measured 7.9 on stream seeds 1-2), so SIT's loss is rarely
    over a single class."""
    assert len(toy_world.classes("stream")) >= 24 and len(toy_world.classes("heldout")) >= 8
    n_classes = len(toy_world.classes("stream"))
    targets = [c for c in range(n_classes) for _ in range(toy_study.PER_CLASS)]  # the folders' order
    assert toy_study.classes_per_batch(targets, range(1, 3)) >= 6


def test_the_world_is_deterministic_for_a_seed(tmp_path):
    a = folder_bytes(toy_world.write_folders(str(tmp_path / "a"), seed=3, n_train=2, n_test=1))
    b = folder_bytes(toy_world.write_folders(str(tmp_path / "b"), seed=3, n_train=2, n_test=1))
    c = folder_bytes(toy_world.write_folders(str(tmp_path / "c"), seed=4, n_train=2, n_test=1))
    assert a == b
    assert a != c
    names = {path.split(os.sep)[2] for path in a if path.startswith("heldout")}
    heldout = toy_world.classes("heldout", 3)
    assert names == {toy_world.class_name(*comp).replace(" ", "_") for comp in heldout}
    image = Image.open(tmp_path / "a" / next(p for p in a if p.endswith(".png")))
    assert image.size == (toy_world.SIZE, toy_world.SIZE) and image.mode == "RGB"


# A short pretraining on world 40, the first reported world: 250 steps of 64 images (the study's:
# 1200 of 128). Measured: held-out zero-shot 63.5 % (bound 3x chance, 37.5 %); stream classes 3.9 % on
# stream images against 24.5 % on clean ones (bound: 10 points apart). On world 41: 40.5, 6.0, 16.2 %.
# 100 steps gave 32.0 % held-out on world 0, too close to chance to guard.
WORLD = 40
SHORT = toy_world.PretrainConfig(steps=250, per_class=60, batch_size=64)


@pytest.fixture(scope="module")
def short_clip():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the float sums of the measured run; and two threads on busy cores crawl
    try:
        yield toy_world.pretrain(replace(SHORT, seed=WORLD), log=None)
    finally:
        torch.set_num_threads(threads)


def test_short_pretraining_transfers_zero_shot_to_held_out_compositions(short_clip):
    assert toy_world.zero_shot(short_clip, "heldout", shifted=False, world=WORLD) >= 3 / 8  # 3x chance


def test_the_stream_starts_below_its_ceiling(short_clip):
    """The untuned model is clearly worse on the stream's images than on clean images of the same
    classes: there is a shift for tuning to undo."""
    stream = toy_world.zero_shot(short_clip, "stream", shifted=True, world=WORLD)
    clean = toy_world.zero_shot(short_clip, "stream", shifted=False, world=WORLD)
    assert clean - stream >= 0.10
