"""The premise of tests/toy_study.py: its world is deterministic, and a CLIP pretrained on it transfers zero-shot."""

import os
from dataclasses import replace

import pytest
import torch
from PIL import Image

import toy_world


def folder_bytes(root):
    """{relative path: file bytes} of every file under root."""
    files = {}
    for parent, _, names in os.walk(root):
        for name in names:
            path = os.path.join(parent, name)
            files[os.path.relpath(path, root)] = open(path, "rb").read()
    return files


def test_groups_split_the_compositions_and_each_holds_every_shape():
    groups = [set(toy_world.classes(g)) for g in toy_world.GROUPS]
    assert sum(map(len, groups)) == len(set.union(*groups)) == len(toy_world.SHAPES) * len(toy_world.TEXTURES)
    for group in groups:
        assert {shape for _, shape in group} == set(range(len(toy_world.SHAPES)))


def test_the_world_is_deterministic_for_a_seed(tmp_path):
    a = folder_bytes(toy_world.write_folders(str(tmp_path / "a"), seed=3, n_train=2, n_test=1))
    b = folder_bytes(toy_world.write_folders(str(tmp_path / "b"), seed=3, n_train=2, n_test=1))
    c = folder_bytes(toy_world.write_folders(str(tmp_path / "c"), seed=4, n_train=2, n_test=1))
    assert a == b
    assert a.keys() == c.keys() and a != c
    names = {path.split(os.sep)[2] for path in a if path.startswith("heldout")}
    assert names == {toy_world.class_name(*comp).replace(" ", "_") for comp in toy_world.classes("heldout")}
    image = Image.open(tmp_path / "a" / next(p for p in a if p.endswith(".png")))
    assert image.size == (toy_world.SIZE, toy_world.SIZE) and image.mode == "RGB"


# A short pretraining, a tenth of the study's. Held-out zero-shot top-1 (chance 1/6 = 16.7%) measured on seeds 0, 1,
# 2: 78.3%, 90.0%, 67.7%. The bound, 3x chance (50%), leaves 28 and 18 points to the two seeds run here.
SHORT = toy_world.PretrainConfig(steps=150, per_class=60, batch_size=64)


@pytest.mark.parametrize("seed", [0, 2])
def test_short_pretraining_transfers_zero_shot_to_held_out_compositions(seed):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the float sums of the measured runs
    try:
        model = toy_world.pretrain(replace(SHORT, seed=seed), log=None)
    finally:
        torch.set_num_threads(threads)
    assert toy_world.zero_shot(model, "heldout", shifted=False) >= 0.5
