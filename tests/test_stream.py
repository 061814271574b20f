"""stream.py against the protocol: the Si-Blurry sampler, the datasets, and the batches the learner sees."""
import os
import random

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import stream
from clip_model import CLIP_MEAN, CLIP_STD
from stream import (
    SCENARIOS, BatchAugment, DataError, SyntheticDataset, eval_batches, eval_transform,
    load_dataset, seen_test_indices, si_blurry_split, si_blurry_tasks, stream_batches,
)

TEN_CLASSES = [i % 10 for i in range(100)]  # the worked examples of issue 4


def random_targets(num_classes, n, seed):
    rng = random.Random(seed)
    return [rng.randrange(num_classes) for _ in range(n)]


def owner_of(split):
    """class -> the task that owns it (disjoint or blurry)."""
    return {c: t for per_task in (split.disjoint_classes, split.blurry_classes)
            for t, classes in enumerate(per_task) for c in classes}


# ---------------------------------------------------------------------------------------------------------------------
# The Si-Blurry sampler

def test_worked_example_si_blurry_seed_1():
    tasks = si_blurry_tasks(TEN_CLASSES, 10, n_tasks=2, n=50, m=20, seed=1, stochastic=True)
    assert tasks[0] == [68, 50, 58, 20, 40, 0, 8, 70, 48, 90, 28, 78, 98, 10, 18, 30, 60, 4, 80, 88]
    assert sorted(tasks[1]) == sorted(set(range(100)) - set(tasks[0]))
    assert tasks[1][:10] == [62, 7, 12, 96, 95, 72, 6, 79, 51, 42] and tasks[1][-4:] == [85, 55, 29, 2]


def test_worked_example_i_blurry_seed_3():
    tasks = si_blurry_tasks(TEN_CLASSES, 10, n_tasks=2, n=50, m=20, seed=3, stochastic=False)
    assert [len(t) for t in tasks] == [50, 50]
    assert tasks[0][:10] == [30, 25, 91, 80, 21, 48, 45, 31, 8, 75]
    assert tasks[1][:10] == [39, 89, 53, 52, 15, 29, 43, 14, 64, 23]


@pytest.mark.parametrize("seed", range(6))
def test_si_blurry_tasks_partition_the_samples_of_the_retained_classes(seed):
    rng = random.Random(seed)
    num_classes, n_tasks = rng.randint(5, 40), rng.randint(1, 5)
    targets = random_targets(num_classes, 400, seed)
    split = si_blurry_split(targets, num_classes, n_tasks, n=rng.randint(0, 100), m=rng.randint(0, 100), seed=seed)
    retained = set(owner_of(split))
    stream_indices = [i for task in split.tasks for i in task]
    assert sorted(stream_indices) == [i for i, y in enumerate(targets) if y in retained]
    assert len(stream_indices) > 0


def test_classes_left_over_by_the_rounding_are_dropped():
    targets = random_targets(23, 500, seed=0)  # D = 23*40//100//4*4 = 8, blurry (23-8)//4*4 = 12: 3 classes dropped
    split = si_blurry_split(targets, 23, n_tasks=4, n=40, m=30, seed=2)
    assert sum(map(len, split.disjoint_classes)) == 8 and sum(map(len, split.blurry_classes)) == 12
    dropped = set(range(23)) - set(owner_of(split))
    assert len(dropped) == 3
    assert not any(targets[i] in dropped for task in split.tasks for i in task)


def test_the_docstrings_example_of_dropped_classes_holds():
    split = si_blurry_split([i % 7 for i in range(700)], 7, n_tasks=5, seed=1)
    assert set(range(7)) - set(owner_of(split)) == {2, 4}
    assert sum(map(len, split.tasks)) == 500


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_disjoint_classes_appear_only_in_their_own_task(stochastic, seed):
    targets = random_targets(30, 600, seed)
    split = si_blurry_split(targets, 30, n_tasks=3, n=50, m=50, seed=seed, stochastic=stochastic)
    disjoint_owner = {c: t for t, classes in enumerate(split.disjoint_classes) for c in classes}
    checked = 0
    for t, task in enumerate(split.tasks):
        for i in task:
            if targets[i] in disjoint_owner:
                assert disjoint_owner[targets[i]] == t
                checked += 1
    assert checked > 0


def test_si_blurry_pool_holds_m_percent_of_the_blurry_samples():
    # 10 blurry classes of 100 samples, 2 tasks, M = 5: the pool is K = 50 samples, unless a task owns fewer blurry
    # samples than its random share (the starving quirk), impossible when each task owns >= K of them
    targets = TEN_CLASSES * 10
    unstarved = 0
    for seed in range(10):
        split = si_blurry_split(targets, 10, n_tasks=2, n=0, m=5, seed=seed)
        owned = [sum(targets.count(c) for c in classes) for classes in split.blurry_classes]
        pooled = sum(map(len, split.blurred))
        assert pooled <= 50
        if min(owned) >= 50:
            assert pooled == 50
            unstarved += 1
    assert unstarved >= 5


def test_i_blurry_blurs_the_first_m_percent_of_each_task_and_drops_the_pool_remainder():
    targets = random_targets(12, 300, seed=5)
    split = si_blurry_split(targets, 12, n_tasks=3, n=50, m=30, seed=4, stochastic=False)
    first = [[i for i, y in enumerate(targets) if y in classes] for classes in split.blurry_classes]
    first = [indices[:len(indices) * 30 // 100] for indices in first]  # in dataset order
    pool_size = sum(map(len, first))
    assert pool_size % 3 > 0  # so the dropped remainder is visible
    assert [len(b) for b in split.blurred] == [pool_size // 3] * 3
    assert {i for b in split.blurred for i in b} <= {i for indices in first for i in indices}
    assert sum(map(len, split.tasks)) == len(targets) - pool_size % 3


def test_disjoint_scenario_is_class_incremental():
    targets = random_targets(20, 400, seed=1)
    split = si_blurry_split(targets, 20, n_tasks=4, seed=1, **SCENARIOS["disjoint"])
    classes_per_task = [{targets[i] for i in task} for task in split.tasks]
    assert [len(c) for c in classes_per_task] == [5, 5, 5, 5]
    assert len(set().union(*classes_per_task)) == 20


def test_same_seed_same_stream_other_seed_other_stream():
    targets = random_targets(20, 400, seed=0)
    assert si_blurry_tasks(targets, 20, seed=3) == si_blurry_tasks(targets, 20, seed=3)
    assert si_blurry_tasks(targets, 20, seed=3) != si_blurry_tasks(targets, 20, seed=4)


@pytest.mark.parametrize("kwargs, name", [
    (dict(n=-1), "n"), (dict(n=101), "n"), (dict(m=-5), "m"), (dict(m=150), "m"),
    (dict(n_tasks=0), "n_tasks"), (dict(n_tasks=11), "n_tasks"), (dict(num_classes=0), "num_classes"),
    (dict(targets=[0, 3, 10]), "targets"), (dict(targets=[0, -1]), "targets"), (dict(targets=[]), "targets"),
])
def test_impossible_arguments_raise_value_error_naming_them(kwargs, name):
    arguments = dict(targets=TEN_CLASSES, num_classes=10, n_tasks=2) | kwargs
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        si_blurry_tasks(**arguments)


def test_describe_stream_counts_samples_and_blur_per_task():
    split = si_blurry_split(TEN_CLASSES, 10, n_tasks=2, n=50, m=20, seed=1)
    text = stream.describe_stream(split, TEN_CLASSES, [f"class {c}" for c in range(10)])
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("task 0: 20 samples") and lines[2].startswith("task 1: 80 samples")
    # with two tasks, what one task blurs out is what the other blurs in
    owner = owner_of(split)
    into = [sum(1 for i in task if owner[TEN_CLASSES[i]] != t) for t, task in enumerate(split.tasks)]
    assert lines[1].endswith(f"blurred in {into[0]}, out {into[1]}")
    assert lines[2].endswith(f"blurred in {into[1]}, out {into[0]}")
    assert min(into) > 0


# ---------------------------------------------------------------------------------------------------------------------
# Datasets

def write_image(path, size=(8, 8), colour=(200, 30, 30), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)


@pytest.fixture
def image_root(tmp_path):
    for split in ("train", "test"):
        for k in range(3 if split == "train" else 2):
            write_image(tmp_path / split / "b_class" / f"{k}.png", colour=(10, 200, 10))
            write_image(tmp_path / split / "a_class" / f"{k}.PNG", colour=(90, 0, 0), mode="L")
    (tmp_path / "train" / "a_class" / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagefolder_classes_sorted_by_folder_with_readable_names(image_root):
    train = load_dataset("imagefolder", str(image_root), train=True)
    test = load_dataset("imagefolder", str(image_root), train=False)
    assert train.classes == ["a class", "b class"] == test.classes
    assert train.targets == [0, 0, 0, 1, 1, 1] and test.targets == [0, 0, 1, 1] and len(train) == 6
    image, label = train[0]  # a greyscale file, read as RGB
    assert image.mode == "RGB" and image.size == (8, 8) and image.getpixel((0, 0)) == (90, 90, 90) and label == 0


def test_imagefolder_missing_root_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_dataset("imagefolder", str(tmp_path / "nowhere"), train=True)


def test_imagefolder_empty_root_names_the_path(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "train")):
        load_dataset("imagefolder", str(tmp_path), train=True)


def test_imagefolder_class_mismatch_names_the_classes(image_root):
    write_image(image_root / "test" / "c_class" / "0.png")
    with pytest.raises(DataError, match="c_class"):
        load_dataset("imagefolder", str(image_root), train=True)


def test_imagefolder_unreadable_image_names_the_path(image_root):
    bad = image_root / "train" / "b_class" / "broken.png"
    bad.write_bytes(b"this is no png")
    dataset = load_dataset("imagefolder", str(image_root), train=True)
    with pytest.raises(DataError, match="broken.png"):
        dataset[dataset.paths.index(str(bad))]


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(DataError, match="cifar100, tinyimagenet, imagenet-r, imagefolder"):
        load_dataset("cifar10", "/tmp", train=True)


def test_missing_dataset_without_download_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "tiny-imagenet-200")):
        load_dataset("tinyimagenet", str(tmp_path), train=True, download=False)


def test_a_failed_download_leaves_no_new_folder(tmp_path):
    missing = (tmp_path / "nowhere" / "tiny-imagenet-200.zip").as_uri()  # fails offline, like no network
    with pytest.raises(OSError, match="tiny-imagenet-200.zip"):
        stream.download_archive("Tiny-ImageNet", missing, str(tmp_path / "data" / "here"), md5="0" * 32)
    assert not (tmp_path / "data").exists()


def test_tinyimagenet_labels_follow_wnids_and_val_annotations(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n09", "n01"]  # wnids.txt is not sorted; labels follow its order, samples the sorted folders
    os.makedirs(folder)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n01\tEgyptian cat\nn05\tunused\nn09\tgolden_retriever, dog\n")
    for wnid in wnids:
        for k in range(2):
            write_image(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG")
    for k, wnid in enumerate(["n01", "n09", "n09"]):
        write_image(folder / "val" / "images" / f"val_{k}.JPEG")
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t8\t8\nval_1.JPEG\tn09\t0\t0\t8\t8\n"
                                                        "val_2.JPEG\tn09\t0\t0\t8\t8\n")
    train = load_dataset("tinyimagenet", str(tmp_path), train=True, download=False)
    test = load_dataset("tinyimagenet", str(tmp_path), train=False, download=False)
    assert train.classes == ["golden retriever", "Egyptian cat"]
    assert train.targets == [1, 1, 0, 0] and os.path.basename(train.paths[0]) == "n01_0.JPEG"
    assert test.targets == [1, 0, 0]


def test_imagenet_r_split_is_fixed_80_20_drawn_with_seed_0(tmp_path):
    folder = tmp_path / "imagenet-r"
    for k in range(200):
        for j in range(1 + k % 2):
            write_image(folder / f"n{k:08d}" / f"{j}.jpg", size=(4, 4))
    train = load_dataset("imagenet-r", str(tmp_path), train=True, download=False)
    test = load_dataset("imagenet-r", str(tmp_path), train=False, download=False)
    assert len(train) == int(300 * 0.8) and len(test) == 300 - len(train)
    assert set(train.paths).isdisjoint(test.paths)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    every_path = sorted(train.paths + test.paths)
    assert train.paths == [every_path[i] for i in sorted(order[:240].tolist())]
    assert train.classes[0] == "goldfish" and len(train.classes) == 200
    torch.manual_seed(1234)  # a run seed must not move the split
    assert load_dataset("imagenet-r", str(tmp_path), train=True, download=False).paths == train.paths


def test_synthetic_dataset_is_deterministic_with_one_grey_grating_per_class():
    train, again = SyntheticDataset(10, 2, image_size=32, seed=3), SyntheticDataset(10, 2, image_size=32, seed=3)
    test = SyntheticDataset(10, 2, image_size=32, seed=3, train=False)
    assert len(train) == 20 and train.targets[:11] == list(range(10)) + [0]
    assert train.classes[:2] == ["1 horizontal stripe", "3 horizontal stripes"]
    assert train.classes[9] == "10 vertical stripes"
    assert len(set(SyntheticDataset(100, 1).classes)) == 100  # beyond ten classes the names stay distinct
    pixels = [TF.pil_to_tensor(train[i][0]).float() for i in range(20)]
    assert train[7][0].mode == "RGB" and pixels[7].shape == (3, 32, 32)
    assert torch.equal(pixels[7], TF.pil_to_tensor(again[7][0]).float())
    assert not torch.equal(pixels[7], TF.pil_to_tensor(test[7][0]).float())
    for i, image in enumerate(pixels):
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey: colour tells nothing
        vertical, stripes = train.pattern(train.targets[i])
        profile = image[0].mean(0 if vertical else 1)  # the intensity across the stripes
        assert torch.fft.rfft(profile - profile.mean()).abs().argmax() == stripes  # the class's stripe count


# ---------------------------------------------------------------------------------------------------------------------
# Batches

DATA = SyntheticDataset(4, 6, image_size=8, seed=0)  # 24 samples, 4 classes
TASKS = si_blurry_tasks(DATA.targets, 4, n_tasks=2, n=50, m=20, seed=1)


def collect(**kwargs):
    arguments = dict(batch_size=5, online_iter=2, workers=0, seed=1) | kwargs
    return list(stream_batches(DATA, TASKS, **arguments))


def test_stream_batches_shapes_labels_and_indices():
    batches = collect(online_iter=3)
    for batch in batches:
        b = len(batch.labels)
        assert batch.images.shape == (3, b, 3, 8, 8) and batch.images.dtype == torch.uint8
        assert batch.labels.dtype == batch.indices.dtype == torch.long
        assert batch.labels.tolist() == [DATA.targets[i] for i in batch.indices.tolist()]


class LabelsOnly(SyntheticDataset):
    def __getitem__(self, i):
        raise AssertionError("stream_labels read an image")


def test_stream_labels_are_the_streams_batches_without_reading_an_image():
    labels_only = stream.stream_labels(LabelsOnly(4, 6, image_size=8, seed=0), TASKS, batch_size=5)
    for mine, full in zip(labels_only, collect(), strict=True):
        assert (mine.task, mine.images) == (full.task, None)
        assert torch.equal(mine.labels, full.labels) and torch.equal(mine.indices, full.indices)


def test_batches_follow_the_stream_and_never_cross_a_task_boundary():
    batches = collect()
    for t, task in enumerate(TASKS):
        mine = [batch for batch in batches if batch.task == t]
        assert [i for batch in mine for i in batch.indices.tolist()] == task
        sizes = [len(batch.labels) for batch in mine]
        assert sizes == [5] * (len(task) // 5) + ([len(task) % 5] if len(task) % 5 else [])
    assert [batch.task for batch in batches] == sorted(batch.task for batch in batches)


def test_augmentation_does_not_depend_on_the_number_of_workers():
    with_workers, in_process = collect(workers=2), collect(workers=0)
    assert all(torch.equal(a.images, b.images) for a, b in zip(with_workers, in_process))
    assert len(with_workers) == len(in_process) > 2


def test_augmentation_is_a_function_of_the_stream_position_not_of_batching():
    by_5 = torch.cat([batch.images for batch in collect(batch_size=5)], dim=1)
    by_3 = torch.cat([batch.images for batch in collect(batch_size=3)], dim=1)
    assert torch.equal(by_5, by_3)


def test_each_online_iteration_gets_a_fresh_augmentation_per_sample():
    images = torch.cat([batch.images for batch in collect(online_iter=2, policy="imagenet")], dim=1)
    differs = (images[0] != images[1]).flatten(1).any(1)  # per sample: the two copies differ
    assert differs.float().mean() > 0.5


def test_other_seed_other_augmentation():
    assert not all(torch.equal(a.images, b.images) for a, b in zip(collect(seed=1), collect(seed=2)))


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_leaves_the_global_rng_untouched(workers):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    collect(workers=workers)
    assert torch.equal(torch.get_rng_state(), state)


def test_variable_size_images_are_fitted_to_size_in_the_workers(tmp_path):
    for k, size in enumerate([(20, 12), (9, 30)]):
        for split in ("train", "test"):
            write_image(tmp_path / split / f"c{k}" / "0.png", size=size)
    dataset = load_dataset("imagefolder", str(tmp_path), train=True)
    batch = next(iter(stream_batches(dataset, [[0, 1]], online_iter=1, workers=0, image_size=16)))
    assert batch.images.shape == (1, 2, 3, 16, 16)
    with pytest.raises(DataError, match="size="):
        next(iter(stream_batches(dataset, [[0, 1]], online_iter=1, workers=0)))


MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def test_batch_augment_resizes_and_clip_normalizes():
    grey = torch.tensor([round(v * 255) for v in CLIP_MEAN], dtype=torch.uint8).view(1, 3, 1, 1).expand(6, 3, 8, 8)
    out = BatchAugment(image_size=16, seed=0)(grey.contiguous())
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    assert out[:, :, 4:12, 4:12].abs().max() < 0.01  # the mean colour normalizes to 0; padding never reaches here
    border = (out - (-MEAN / STD)).abs().amax(1) < 1e-5  # the zero padding is black before normalization
    assert border.any() and ((out.abs().amax(1) < 0.01) | border).all()


def test_batch_augment_is_a_padded_random_crop_maybe_mirrored():
    images = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = BatchAugment(image_size=12, seed=0)(images)
    padded = torch.nn.functional.pad(TF.resize(images, [12, 12], antialias=True), (4, 4, 4, 4)).float() / 255
    padded = (padded - MEAN) / STD
    found = set()
    for k in range(32):
        matches = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
                   if torch.allclose(out[k], (lambda x: x.flip(-1) if flip else x)(
                       padded[k, :, top:top + 12, left:left + 12]), atol=1e-5)]
        assert len(matches) == 1
        found.add(matches[0])
    assert {flip for _, _, flip in found} == {False, True} and len({(t, l) for t, l, _ in found}) > 10


def test_batch_augment_same_seed_same_draws_other_seed_other_draws():
    images = torch.randint(0, 256, (8, 3, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(BatchAugment(16, seed=5)(images), BatchAugment(16, seed=5)(images))
    assert not torch.equal(BatchAugment(16, seed=5)(images), BatchAugment(16, seed=6)(images))


def test_eval_transform_matches_openai_pil_preprocessing():
    smooth = TF.resize(torch.randint(0, 256, (3, 10, 15), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0)), [40, 60], antialias=True)
    openai = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(24), T.ToTensor(),
                        T.Normalize(CLIP_MEAN, CLIP_STD)])
    expected = openai(TF.to_pil_image(smooth))
    ours = eval_transform(smooth[None], 24)[0]
    assert ours.shape == expected.shape == (3, 24, 24)
    assert (ours - expected).abs().max() <= 1.5 / 255 / min(CLIP_STD)  # at most one grey level apart


def test_squashed_test_images_equal_pil_bilinear_resize_within_uint8_rounding():
    for shape, image_size in (((3, 10, 15), 24), ((3, 64, 40), 24)):  # upsampled (CIFAR-like) and downsampled
        image = TF.resize(torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                          [2 * shape[1], 2 * shape[2]], antialias=True)  # smooth, as photographs are
        released = T.Compose([T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR),
                              T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        expected = released(TF.to_pil_image(image))
        ours = eval_transform(image[None], image_size, resize="squash")[0]
        assert ours.shape == expected.shape == (3, image_size, image_size)
        assert (ours - expected).abs().max() <= 1.5 / 255 / min(CLIP_STD)  # at most one grey level apart


def test_eval_transform_normalizes_with_the_given_mean_and_std():
    mean, std = stream.DATASET_STATS["cifar100"]
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(eval_transform(images, 8, resize="squash", mean=mean, std=std), expected)


class Same(torch.utils.data.Dataset):
    """Every index holds the same image: what per-batch and per-sample augmentation do is then easy to see."""
    def __init__(self, n):
        self.targets, self.classes, self.image = [i % 2 for i in range(n)], ["a", "b"], DATA[0][0]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.image, self.targets[i]


@pytest.mark.parametrize("per", ["batch", "sample"])
def test_augmentation_per_batch_treats_identical_images_identically(per):
    data = Same(16)
    (batch,) = stream_batches(data, [list(range(16))], batch_size=16, online_iter=2, workers=0, seed=3,
                              augment_per=per)
    augment = BatchAugment(12, seed=3, per=per)
    for copy in batch.images:  # each online iteration
        out = augment(copy)
        identical = all(torch.equal(copy[0], image) for image in copy) and all(torch.equal(out[0], x) for x in out)
        assert identical == (per == "batch")
    assert not torch.equal(batch.images[0], batch.images[1])  # a fresh draw at every online iteration


def test_random_fit_is_the_released_resize_then_random_crop_drawn_once_per_seed():
    image = TF.to_pil_image(torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(0)))
    resized = TF.pil_to_tensor(TF.resize(image, 16 * 8 // 7, T.InterpolationMode.BILINEAR))  # (3, 18, 30)
    crops = [TF.pil_to_tensor(stream.fit_image(image, 16, "random", seed=s)) for s in range(8)]
    for crop in crops:
        assert crop.shape == (3, 16, 16)
        assert any(torch.equal(crop, resized[:, t:t + 16, l:l + 16]) for t in range(3) for l in range(15))
    assert torch.equal(crops[0], TF.pil_to_tensor(stream.fit_image(image, 16, "random", seed=0)))
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 1


@pytest.mark.parametrize("image_fit", ["centre", "random", "squash"])
def test_each_geometry_is_the_same_when_loaded_and_on_the_device(image_fit):
    smooth = TF.resize(torch.randint(0, 256, (3, 9, 14), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0)), [36, 56], antialias=True)
    loaded = TF.pil_to_tensor(stream.fit_image(TF.to_pil_image(smooth), 16, image_fit, seed=4))  # PIL, in a worker
    batched = stream.fit_image(smooth[None].expand(2, 3, 36, 56), 16, image_fit, seed=4)  # uint8, on the device
    assert batched.shape == (2, 3, 16, 16)
    assert (loaded.int() - batched.int()).abs().max() <= 1  # one grey level: PIL's and torch's rounding


class Photos(torch.utils.data.Dataset):
    """A torchvision-style dataset: (PIL image, label) items of any size, in RGB, greyscale, palette or RGBA."""
    modes = ("RGB", "L", "P", "RGBA")

    def __len__(self):
        return 8

    def __getitem__(self, i):
        pixels = torch.randint(0, 256, (3, 20 + 5 * i, 31 - 2 * i), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(i))
        return TF.to_pil_image(pixels).convert(self.modes[i % 4]), i % 3


@pytest.mark.parametrize("resize", ["centre", "squash"])
def test_test_images_of_any_mode_and_size_equal_the_pil_preprocessing_exactly(resize):
    # zero-shot transfer: fitted to image_size when loaded, then eval_transform; OpenAI's PIL pipeline, or the released
    mode = T.InterpolationMode
    geometry = ([T.Resize(16, interpolation=mode.BICUBIC), T.CenterCrop(16)] if resize == "centre"
                else [T.Resize((16, 16), interpolation=mode.BILINEAR)])
    reference = T.Compose(geometry + [T.Lambda(lambda image: image.convert("RGB")), T.ToTensor(),
                                      T.Normalize(CLIP_MEAN, CLIP_STD)])
    data = Photos()
    batches = eval_batches(data, range(len(data)), batch_size=3, workers=0, image_size=16, resize=resize)
    ours = torch.cat([eval_transform(images, 16, resize=resize) for images, _ in batches])
    torch.testing.assert_close(ours, torch.stack([reference(data[i][0]) for i in range(len(data))]))


def test_channel_stats_are_the_pixel_mean_and_std():
    mean, std = stream.channel_stats(Same(4))
    pixels = TF.pil_to_tensor(DATA[0][0]).flatten(1).double() / 255
    assert mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-4)
    assert std == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-4)


def test_eval_batches_come_in_index_order():
    indices = torch.tensor([7, 2, 19, 4, 11])
    batches = list(eval_batches(DATA, indices, batch_size=2, workers=2))
    images = torch.cat([images for images, _ in batches])
    assert [len(labels) for _, labels in batches] == [2, 2, 1]
    assert torch.cat([labels for _, labels in batches]).tolist() == [DATA.targets[i] for i in indices.tolist()]
    assert torch.equal(images[2], TF.pil_to_tensor(DATA[19][0]))


def test_seen_test_indices_are_the_test_samples_of_seen_classes_in_order():
    test_targets = [3, 0, 1, 3, 2, 0, 1]
    assert seen_test_indices(test_targets, {0, 3}).tolist() == [0, 1, 3, 5]
    assert seen_test_indices(test_targets, set()).tolist() == []
