"""
The paper's setting: a Si-Blurry stream of T tasks, N % of the classes disjoint (in one task only),
M % of the other classes' samples dealt to any task, read in batches seen once, with AutoAugment,
crop and flip; the seen classes' test images. The split is index for index the released one
(KHU-AGI/Si-Blurry, Debatrix/LifeLong-CLIP).
"""
import collections
import contextlib
import functools
import hashlib
import itertools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode

import clip_model


# ---- the Si-Blurry stream ----

SCENARIOS = {
    "si-blurry": dict(stochastic=True, n=50, m=10),
    "i-blurry": dict(stochastic=False, n=50, m=10),
    "disjoint": dict(stochastic=False, n=100, m=0),
}


class StreamSplit(NamedTuple):
    """A stream and its class split, per task."""
    tasks: list             # dataset indices in stream order
    disjoint_classes: list  # classes whose samples occur in this task only
    blurry_classes: list    # blurry classes owned by this task (its samples may go to any task)
    blurred: list           # dataset indices this task received from the pool of blurred samples


def si_blurry_split(targets, num_classes, n_tasks=5, n=50, m=10, seed=1, stochastic=True) -> StreamSplit:
    """Si-Blurry stream (stochastic) or i-Blurry-like stream: N% of classes disjoint, M% of blurry
    samples blurred.
    As released, class counts are rounded down to multiples of n_tasks and the classes left over are
    dropped with their samples (7 classes in 5 tasks, seed 1: classes 2 and 4, 200 of 700 samples);
    stochastic=False also drops the last len(pool) % n_tasks pooled samples."""
    if not 1 <= n_tasks <= num_classes:
        raise ValueError(f"n_tasks={n_tasks} is outside 1..num_classes={num_classes}: "
                         "every class would be dropped")
    for name, value in (("n", n), ("m", m)):
        if not 0 <= value <= 100:
            raise ValueError(f"{name} is a percentage in 0..100, got {value}")
    targets = torch.as_tensor(targets).tolist()
    outside = sorted({y for y in targets if not 0 <= y < num_classes})
    if not targets or outside:
        raise ValueError(f"targets must be one or more labels in 0..{num_classes - 1}; "
                         f"got {len(targets)} labels, these outside: {outside[:5]}")
    g = torch.Generator().manual_seed(seed)  # the only randomness, drawn in the released order
    n_disjoint = num_classes * n // 100 // n_tasks * n_tasks
    # quirk: the classes left over by the rounding are dropped
    n_blurry = (num_classes - n_disjoint) // n_tasks * n_tasks
    order = torch.randperm(num_classes, generator=g).tolist()
    disjoint = order[:n_disjoint]
    blurry = order[n_disjoint:n_disjoint + n_blurry]
    if stochastic:
        disjoint_classes = _cut(disjoint, _random_sizes(n_disjoint, n_tasks, g))
        blurry_classes = _cut(blurry, _random_sizes(n_blurry, n_tasks, g))
    else:
        disjoint_classes = _cut(disjoint, [n_disjoint // n_tasks] * n_tasks)
        blurry_classes = _cut(blurry, [n_blurry // n_tasks] * n_tasks)
    disjoint_indices = _indices_by_task(targets, disjoint_classes)
    blurry_indices = _indices_by_task(targets, blurry_classes)

    # The pool of blurred samples, dealt in task order: shares[t] samples to task t while it lasts.
    if stochastic:
        shares = _random_sizes(sum(map(len, blurry_indices)) * m // 100, n_tasks, g)
        blurry_indices, pool = _pool(blurry_indices, shares, g)
        # quirk: a task short of its share shortens the pool, starving later tasks
        blurred = _cut(pool, shares)
    else:
        blurry_indices, pool = _pool(blurry_indices, [len(b) * m // 100 for b in blurry_indices], g)
        # quirk: the last len(pool) % n_tasks samples of the pool are dropped
        blurred = _cut(pool, [len(pool) // n_tasks] * n_tasks)

    tasks = []
    for t in range(n_tasks):  # each task shuffled in turn
        task = disjoint_indices[t] + blurry_indices[t] + blurred[t]
        tasks.append([task[i] for i in torch.randperm(len(task), generator=g).tolist()])
    return StreamSplit(tasks, disjoint_classes, blurry_classes, blurred)


def si_blurry_tasks(targets, num_classes, n_tasks=5, n=50, m=10, seed=1, stochastic=True) -> list:
    """Per task, the dataset indices of the stream in stream order (see `si_blurry_split`)."""
    return si_blurry_split(targets, num_classes, n_tasks, n, m, seed, stochastic).tasks


def _random_sizes(total: int, n_tasks: int, g: torch.Generator) -> list[int]:
    """Sizes of n_tasks parts of `total`, cut at sorted random points."""
    if total == 0:
        return [0] * n_tasks
    points = torch.randint(0, total, (n_tasks - 1,), generator=g).sort().values.tolist()
    cuts = [0] + points + [total]
    return [b - a for a, b in zip(cuts, cuts[1:])]


def _cut(items: list, sizes: list[int]) -> list[list]:
    """Consecutive groups of items with the given sizes."""
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    return [items[s:s + size] for s, size in zip(starts, sizes)]


def _indices_by_task(targets: list[int], classes_per_task: list[list[int]]) -> list[list[int]]:
    """Per task, the dataset indices of its classes, in dataset order."""
    owner = {c: t for t, classes in enumerate(classes_per_task) for c in classes}
    indices = [[] for _ in classes_per_task]
    for i, y in enumerate(targets):
        if y in owner:
            indices[owner[y]].append(i)
    return indices


def _pool(blurry_indices, taken: list[int], g: torch.Generator) -> tuple[list, list[int]]:
    """Each task's remaining blurry indices, and the shuffled pool of the first taken[t] of task t."""
    kept = []
    pool = []
    for indices, k in zip(blurry_indices, taken):
        pool += indices[:k]  # quirk: the first k of the task's list, in dataset order
        kept.append(indices[k:])
    return kept, [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]


def _first_names(cs, classes) -> str:
    """' (name, name, name, ...)': the first three classes of cs ('' for none)."""
    if not cs:
        return ""
    more = ", ..." if len(cs) > 3 else ""
    return f" ({', '.join(classes[c] for c in cs[:3])}{more})"


def describe_stream(split: StreamSplit, targets, classes) -> str:
    """A one-screen summary of a stream: per task, its classes, samples, and samples blurred in and out."""
    owner = {}  # class -> the task that owns it
    for per_task in (split.disjoint_classes, split.blurry_classes):
        for t, cs in enumerate(per_task):
            owner.update(dict.fromkeys(cs, t))
    # (owning task, task) of every sample
    moves = [(owner[int(targets[i])], t) for t, task in enumerate(split.tasks) for i in task]
    blurred_out = collections.Counter(home for home, t in moves if home != t)
    blurred_in = collections.Counter(t for home, t in moves if home != t)
    n_disjoint = sum(map(len, split.disjoint_classes))
    n_blurry = sum(map(len, split.blurry_classes))
    n_dropped = len(classes) - n_disjoint - n_blurry
    lines = [f"stream: {len(split.tasks)} tasks, {len(moves)} samples, {n_disjoint} disjoint and "
             f"{n_blurry} blurry classes ({n_dropped} dropped by rounding), "
             f"{sum(map(len, split.blurred))} samples dealt from the blur pool"]
    per_task = zip(split.tasks, split.disjoint_classes, split.blurry_classes)
    for t, (task, d, b) in enumerate(per_task):
        lines.append(f"task {t}: {len(task)} samples | disjoint {len(d)}{_first_names(d, classes)} "
                     f"| blurry {len(b)}{_first_names(b, classes)} "
                     f"| blurred in {blurred_in[t]}, out {blurred_out[t]}")
    return "\n".join(lines)


# ---- batches and augmentation, train and test ----

POLICIES = {"cifar10": AutoAugmentPolicy.CIFAR10, "imagenet": AutoAugmentPolicy.IMAGENET}
AUGMENT_PER = ("sample", "batch")  # one random draw per sample (ours) or per batch (released)
# Geometries of `fit_image`: variable-size images when loaded (--image-fit), test images
IMAGE_FITS = ("centre", "random")
TEST_RESIZES = ("centre", "squash")


def _seed_of(*parts) -> int:
    """A 63-bit seed, a fixed function of some integers (Python's hash() promises no such thing)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StreamBatch(NamedTuple):
    """One batch of the stream, with online_iter independently augmented copies of its images."""
    task: int              # the task of every sample in the batch
    images: torch.Tensor   # (online_iter, B, 3, H, W) uint8, each copy with its own AutoAugment
    labels: torch.Tensor   # (B,) int64
    indices: torch.Tensor  # (B,) int64 dataset indices


def task_batches(tasks, batch_size) -> list[tuple[int, list[int]]]:
    """(task, dataset indices) of each batch of the stream; a task's last batch may be short."""
    batches = []
    for t, task in enumerate(tasks):
        batches += [(t, task[b:b + batch_size]) for b in range(0, len(task), batch_size)]
    return batches


def fit_image(image, image_size, image_fit="centre", seed=0):
    """A PIL image or uint8 tensor (3, H, W) or (B, 3, H, W) brought to S x S, S = image_size (None:
    unchanged); on tensors torchvision rounds and clamps to within one grey level of PIL.
    centre: the shorter side resized to S (bicubic), then a centre crop: OpenAI's test geometry.
    random: the shorter side resized to S * 8/7 (bilinear), then a crop drawn from `seed`: the
    released ImageNet-R loader's Resize(256) + RandomCrop(224), for train and test images.
    squash: the whole image resized to S x S (bilinear, aspect ratio not kept): the released test
    geometry."""
    if image_size is None:
        return image
    if image_fit == "centre":
        image = TF.resize(image, image_size, InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(image, image_size)
    if image_fit == "squash":
        size = [image_size, image_size]
        return TF.resize(image, size, InterpolationMode.BILINEAR, antialias=True)
    if image_fit != "random":
        raise ValueError(f"image_fit must be centre, random or squash; got {image_fit!r}")
    image = TF.resize(image, image_size * 8 // 7, InterpolationMode.BILINEAR, antialias=True)
    _, height, width = TF.get_dimensions(image)
    g = torch.Generator().manual_seed(seed)
    top = int(torch.randint(0, height - image_size + 1, (1,), generator=g))
    left = int(torch.randint(0, width - image_size + 1, (1,), generator=g))
    return TF.crop(image, top, left, image_size, image_size)


def _stack(images, dim=0) -> torch.Tensor:
    """torch.stack, or a DataError when the images differ in size."""
    sizes = sorted({tuple(image.shape[-2:]) for image in images})
    if len(sizes) > 1:
        raise DataError(f"images of different sizes {sizes[:3]} in one batch; "
                        "pass image_size= to fit them when loaded")
    return torch.stack(images, dim)


def _augment(autoaugment: AutoAugment, image: Image.Image, seed: int) -> Image.Image:
    """AutoAugment whose draws (sub-policy, probabilities, signs) are a function of the seed."""
    with torch.random.fork_rng(devices=[]):  # AutoAugment draws from the global RNG: leave it untouched
        torch.default_generator.manual_seed(seed)
        return autoaugment(image)


class StreamBatches(Dataset):
    """Item b: batch b of the stream (a StreamBatch); batches never cross a task boundary. AutoAugment
    is drawn per sample, or once per batch and online iteration (augment_per="batch", as released),
    from the seed and the stream position."""

    def __init__(self, dataset, tasks, batch_size=64, online_iter=3, policy="cifar10", seed=1,
                 image_size=None, augment_per="sample", image_fit="centre"):
        self.dataset = dataset
        self.batches = task_batches(tasks, batch_size)
        lengths = (len(indices) for _, indices in self.batches)
        self.starts = list(itertools.accumulate(lengths, initial=0))  # stream position of each batch
        self.online_iter = online_iter
        self.autoaugment = AutoAugment(POLICIES[policy])
        self.seed = seed
        self.image_size = image_size
        self.augment_per = augment_per
        self.image_fit = image_fit

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> StreamBatch:
        t, indices = self.batches[b]
        copies = []
        labels = []
        for position, index in enumerate(indices, self.starts[b]):
            image, label = self.dataset[index]
            # once per sample, shared by its online iterations (as the released random crop)
            fit_seed = _seed_of(self.seed, position, -1)
            image = fit_image(image, self.image_size, self.image_fit, seed=fit_seed)
            key = position if self.augment_per == "sample" else b
            seeds = [_seed_of(self.seed, key, it) for it in range(self.online_iter)]
            augmented = [_augment(self.autoaugment, image, s) for s in seeds]
            copies.append(torch.stack([TF.pil_to_tensor(a) for a in augmented]))  # (online_iter, 3, H, W)
            labels.append(label)
        return StreamBatch(t, _stack(copies, dim=1), torch.tensor(labels), torch.tensor(indices))


def _loader(batches, workers: int, collate_fn=None) -> DataLoader:
    """batches[0], batches[1], ... in turn (through collate_fn), read in DataLoader workers."""
    return DataLoader(batches, batch_size=None, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator())  # seeds the workers; the caller's RNG stays untouched


def stream_batches(dataset, tasks, batch_size=64, online_iter=3, policy="cifar10", workers=2, seed=1,
                   image_size=None, augment_per="sample", image_fit="centre") -> DataLoader:
    """StreamBatches, read by `workers`."""
    batches = StreamBatches(dataset, tasks, batch_size, online_iter, policy, seed, image_size,
                            augment_per, image_fit)
    return _loader(batches, workers)


def stream_labels(dataset, tasks, batch_size=64) -> list[StreamBatch]:
    """The stream's batches, labels alone (images None): zero-shot CLIP trains nothing."""
    return [StreamBatch(t, None, torch.tensor([dataset.targets[i] for i in ids]), torch.tensor(ids))
            for t, ids in task_batches(tasks, batch_size)]


@functools.cache
def _mean_std(device: torch.device, mean: tuple, std: tuple):
    """The channel mean and std as (1, 3, 1, 1) tensors, made once per device (it waits for the GPU)."""
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor, mean=clip_model.CLIP_MEAN, std=clip_model.CLIP_STD):
    """uint8 (B, 3, H, W) -> float (x / 255 - mean) / std per channel."""
    mean, std = _mean_std(images.device, tuple(mean), tuple(std))
    return (images.float() / 255 - mean) / std


class BatchAugment:
    """The training transform after AutoAugment, batched on the device: squash, random crop of the
    zero-padded images (as released), h-flip, normalize. Drawn per="sample" or once per "batch"
    (as the released transform, applied to the batch tensor)."""

    def __init__(self, image_size: int, seed: int, padding: int = 4, mean=clip_model.CLIP_MEAN,
                 std=clip_model.CLIP_STD, per="sample"):
        self.image_size = image_size
        self.seed = seed
        self.padding = padding
        self.per = per
        self.mean = mean
        self.std = std
        self.generator = None  # made on the device of the first batch, seeded with the run seed

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, any H, W) -> float (B, 3, S, S), S = image_size."""
        if self.generator is None:
            self.generator = torch.Generator(images.device).manual_seed(self.seed)
        images = fit_image(images, self.image_size, "squash")
        B, C, H, W = images.shape  # H = W = S
        p = self.padding
        device = images.device
        draws = B if self.per == "sample" else 1  # one draw broadcast to the whole batch
        padded = F.pad(images, (p, p, p, p))  # (B, 3, H+2p, W+2p)
        g = self.generator
        top = torch.randint(0, 2 * p + 1, (draws,), generator=g, device=device).expand(B)
        left = torch.randint(0, 2 * p + 1, (draws,), generator=g, device=device).expand(B)
        flip = (torch.rand(draws, generator=g, device=device) < 0.5).expand(B)
        rows = top[:, None] + torch.arange(H, device=device)  # (B, H) rows of the padded image
        cols = left[:, None] + torch.arange(W, device=device)  # (B, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # columns read backwards: the h-flip
        sample = torch.arange(B, device=device).view(B, 1, 1, 1)
        channel = torch.arange(C, device=device).view(C, 1, 1)
        # advanced indexing broadcasts (B,1,1,1), (C,1,1), (B,1,H,1), (B,1,1,W) to (B, C, H, W)
        crops = padded[sample, channel, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]
        return normalize(crops, self.mean, self.std)


def eval_batches(dataset, indices, batch_size=512, workers=2, image_size=None, resize="centre",
                 image_fit="centre", seed=0):
    """Test samples in index order: (uint8 images (B, 3, H, W), labels (B,)), fitted to `image_size`
    when loaded (see _eval_batch)."""
    indices = [int(i) for i in indices]
    chunks = [indices[b:b + batch_size] for b in range(0, len(indices), batch_size)]
    collate = functools.partial(_eval_batch, dataset, image_size, resize, image_fit, seed)
    return _loader(chunks, workers, collate)


def _eval_batch(dataset, image_size, resize, image_fit, seed, indices):
    """A test batch fitted by `resize`, after, with image_fit="random", a crop drawn from `seed`."""
    images = []
    labels = []
    for index in indices:
        image, label = dataset[index]
        if image_fit == "random":  # the released ImageNet-R loader crops test images at random too
            image = fit_image(image, image_size, "random", seed=_seed_of(seed, index, -2))
        image = fit_image(image, image_size, resize)
        images.append(TF.pil_to_tensor(image.convert("RGB")))  # RGB after the geometry, as OpenAI's
        labels.append(label)
    return _stack(images), torch.tensor(labels)


def eval_transform(images: torch.Tensor, image_size: int, resize="centre",
                   mean=clip_model.CLIP_MEAN, std=clip_model.CLIP_STD) -> torch.Tensor:
    """uint8 test images (B, 3, H, W) -> float (B, 3, S, S), S = image_size: `resize`, normalize."""
    return normalize(fit_image(images, image_size, resize), mean, std)


def seen_test_indices(test_targets, seen_classes) -> torch.Tensor:
    """The test indices of the seen classes, in index order."""
    targets = torch.as_tensor(test_targets, dtype=torch.long)
    seen = torch.as_tensor(sorted(seen_classes), dtype=torch.long)
    return torch.isin(targets, seen).nonzero().flatten()


# ---- machinery: datasets and downloads (not the method) ----
# A dataset gives `targets`, readable `classes`, `raw_classes` (the released prompt names) and
# (PIL RGB image, label) items.

class DataError(ValueError):
    """A problem with the user's data: a missing, empty or inconsistent folder, an unreadable file."""


class SyntheticDataset(Dataset):
    """Generated images, cheap and deterministic, that a tiny model can learn: class c is a grey
    grating (stripes) with its own orientation and frequency, each image with its own phase and
    noise. Shape, not colour, tells the classes apart, so AutoAugment's colour operations, flips and
    crops leave them learnable."""

    FREQUENCIES = (1, 3, 5, 7, 10)  # stripes across the image: 2 orientations x 5 = 10 patterns

    def __init__(self, num_classes: int, per_class: int, image_size: int = 32, seed: int = 0,
                 train: bool = True):
        self.targets = [i % num_classes for i in range(num_classes * per_class)]
        self.classes = []
        for vertical, stripes in map(self.pattern, range(num_classes)):
            direction = "vertical" if vertical else "horizontal"
            self.classes.append(f"{stripes} {direction} stripe{'s' if stripes > 1 else ''}")
        self.raw_classes = list(self.classes)
        self.image_size = image_size
        self.seed = seed
        self.train = train

    def pattern(self, c: int) -> tuple[bool, int]:
        """Class c's grating: (vertical stripes?, number of stripes); beyond ten classes, 10 more
        stripes per ten classes (too fine for a tiny model at 32 px: for benchmarks)."""
        k = len(self.FREQUENCIES)
        return (c // k) % 2 == 1, self.FREQUENCIES[c % k] + 10 * (c // (2 * k))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        # made on demand: building the dataset is free
        g = torch.Generator().manual_seed(_seed_of(self.seed, self.train, i))
        vertical, stripes = self.pattern(self.targets[i])
        S = self.image_size
        coord = torch.arange(S, dtype=torch.float32).view((1, S) if vertical else (S, 1))
        phase = 2 * torch.pi * torch.rand((), generator=g)
        # (S, 1) or (1, S) in [0, 1]
        wave = 0.5 + 0.5 * torch.sin(2 * torch.pi * stripes * coord / S + phase)
        pixels = 60 + 140 * wave.expand(S, S) + torch.randn(S, S, generator=g) * 8  # (S, S) grey levels
        image = TF.to_pil_image(pixels.clamp(0, 255).to(torch.uint8).expand(3, S, S))
        return image, self.targets[i]


class ImageFiles(Dataset):
    """Images on disk, read as PIL RGB when indexed."""

    def __init__(self, paths: list[str], targets: list[int], classes: list[str], raw_classes: list):
        self.paths = paths
        self.targets = targets
        self.classes = classes
        self.raw_classes = raw_classes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.paths[i]) as image:
                return image.convert("RGB"), self.targets[i]
        except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise DataError(f"cannot read image {self.paths[i]}: {err}") from err


def _class_folders(folder: str) -> list[str]:
    """A folder's sorted subfolders, one per class."""
    names = []
    if os.path.isdir(folder):
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not names:
        raise DataError(f"{folder} is missing or has no class folders "
                        f"(expected {folder}/<class>/<images>)")
    return names


def _image_files(folder: str) -> list[str]:
    """The image files under a folder in ImageFolder's order (sorted walk), so indices match it."""
    files = [os.path.join(directory, name)
             for directory, _, names in sorted(os.walk(folder, followlinks=True))
             for name in sorted(names) if name.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise DataError(f"{folder} is missing or has no images "
                        f"(expected files ending in {', '.join(IMG_EXTENSIONS)})")
    return files


def _labelled_files(folder: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """The image files under folder/<class>/ in ImageFolder's order, labelled by `classes`."""
    label_of = {c: k for k, c in enumerate(classes)}
    paths = []
    labels = []
    for c in sorted(classes):
        files = _image_files(os.path.join(folder, c))
        paths += files
        labels += [label_of[c]] * len(files)
    return paths, labels


def _read_lines(path: str) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def write_file(path, data):
    """Write bytes atomically: a crash or a full disk leaves PATH as it was, no PATH.tmp."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + ".tmp")
        if isinstance(e, OSError):  # a failed write names no file
            raise OSError(e.errno, e.strerror, path) from None
        raise


def download_archive(what: str, url: str, root: str, md5: str, filename: str = None) -> None:
    """Download an archive into root and unpack it there (md5-checked). An archive already at
    root/filename with the right md5 is unpacked without a connection: put it there by hand."""
    filename = filename or os.path.basename(url)
    archive = os.path.join(root, filename)
    try:  # a failed download leaves no empty folder; a partial archive fails the md5 check
        with clip_model.undo_new_folders(root):
            download_and_extract_archive(url, root, filename=filename, md5=md5)
    except RuntimeError as err:  # torchvision's md5 check after the download
        raise DataError(f"the {what} archive downloaded from {url} is corrupt ({err}); "
                        f"delete {archive} and try again") from None
    except OSError as err:  # no network, DNS, HTTP error (a URLError is an OSError), full disk
        raise clip_model.DownloadError(what, url, err, archive) from None


def _fetch(root: str, folder: str, url: str, md5: str, download: bool, what: str) -> str:
    """root/folder, downloading and unpacking the official archive first if it is missing."""
    path = os.path.join(root, folder)
    if not os.path.isdir(path):
        if not download:
            raise DataError(f"{path} not found; pass download=True to fetch {url}")
        download_archive(what, url, root, md5)
    return path


def _cifar100(root: str, train: bool, download: bool) -> Dataset:
    """CIFAR-100 through torchvision, from the archive its authors publish (md5-checked)."""
    cifar = torchvision.datasets.CIFAR100
    _fetch(root, cifar.base_folder, cifar.url, cifar.tgz_md5, download, "CIFAR-100")
    try:
        dataset = cifar(root, train=train, download=False)  # checks the md5 of every file
    except (OSError, RuntimeError) as err:
        folder = os.path.join(root, cifar.base_folder)
        raise DataError(f"cannot load CIFAR-100 from {folder}: {err}") from err
    dataset.raw_classes = list(dataset.classes)  # "aquarium_fish", as the released code prompts
    dataset.classes = [c.replace("_", " ") for c in dataset.classes]
    return dataset


# Stanford and Berkeley publish no checksum: these MD5s are the ones other loaders check
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
IMAGENET_R_MD5 = "a61312130a589d0ca1a8fca1f2bd3337"


def _tinyimagenet(root: str, train: bool, download: bool) -> Dataset:
    """Tiny-ImageNet-200: train folders; the val folder, labelled by its annotations, is the test set."""
    folder = _fetch(root, "tiny-imagenet-200", TINYIMAGENET_URL, TINYIMAGENET_MD5, download,
                    "Tiny-ImageNet")
    wnids = _read_lines(os.path.join(folder, "wnids.txt"))  # labels in this order (as released)
    words_path = os.path.join(folder, "words.txt")
    words = dict(line.split("\t", 1) for line in _read_lines(words_path))
    missing = [w for w in wnids if w not in words]
    if missing:
        raise DataError(f"{words_path} has no name for {', '.join(missing[:5])}")
    # the first synonym: "Egyptian cat"
    classes = [words[w].split(",")[0].strip().replace("_", " ") for w in wnids]
    raw = classes
    if len(wnids) == len(TINYIMAGENET_RELEASED_NAMES):
        raw = list(TINYIMAGENET_RELEASED_NAMES)
    if train:
        return ImageFiles(*_labelled_files(os.path.join(folder, "train"), wnids), classes, raw)
    annotations_path = os.path.join(folder, "val", "val_annotations.txt")
    wnid_of = dict(line.split("\t")[:2] for line in _read_lines(annotations_path))
    label_of = {wnid: k for k, wnid in enumerate(wnids)}
    paths = _image_files(os.path.join(folder, "val", "images"))
    targets = [label_of.get(wnid_of.get(os.path.basename(path))) for path in paths]
    if None in targets:
        raise DataError(f"{annotations_path} gives no known class for {paths[targets.index(None)]}")
    return ImageFiles(paths, targets, classes, raw)


def _imagenet_r(root: str, train: bool, download: bool) -> Dataset:
    """ImageNet-R: 200 class folders, split 80/20 by a generator seeded 0 (whatever the run seed)."""
    folder = _fetch(root, "imagenet-r", IMAGENET_R_URL, IMAGENET_R_MD5, download, "ImageNet-R")
    wnids = _class_folders(folder)
    if len(wnids) != len(IMAGENET_R_CLASSES):
        raise DataError(f"{folder} has {len(wnids)} class folders; "
                        f"ImageNet-R has {len(IMAGENET_R_CLASSES)}")
    paths, labels = _labelled_files(folder, wnids)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))
    n_train = int(len(paths) * 0.8)
    keep = sorted((order[:n_train] if train else order[n_train:]).tolist())
    raw = [name.replace(" ", "_") for name in IMAGENET_R_CLASSES]  # as released: "great_white_shark"
    classes = list(IMAGENET_R_CLASSES)
    return ImageFiles([paths[i] for i in keep], [labels[i] for i in keep], classes, raw)


def _imagefolder(root: str, train: bool, download: bool) -> Dataset:
    """A user's own data: ROOT/train/<class>/* and ROOT/test/<class>/*, classes in folder order."""
    train_folder = os.path.join(root, "train")
    test_folder = os.path.join(root, "test")
    names = _class_folders(train_folder)
    test_names = _class_folders(test_folder)
    if names != test_names:
        raise DataError(f"{train_folder} and {test_folder} have different class folders: "
                        f"{sorted(set(names) ^ set(test_names))}")
    classes = [name.replace("_", " ") for name in names]
    paths, labels = _labelled_files(train_folder if train else test_folder, names)
    return ImageFiles(paths, labels, classes, names)


DATASETS = {"cifar100": _cifar100, "tinyimagenet": _tinyimagenet, "imagenet-r": _imagenet_r,
            "imagefolder": _imagefolder}


def load_dataset(name: str, root: str, train: bool, download: bool = True) -> Dataset:
    """The train or test split of a dataset by name."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name](os.path.expanduser(root), train, download)


# The released code normalizes with the dataset's channel statistics, training and test images alike.
DATASET_STATS = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenet-r": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}


def channel_stats(dataset, limit=10_000) -> tuple[tuple, tuple]:
    """Per-channel mean and std of pixels in [0, 1], over at most about `limit` evenly spaced images
    (folders are sorted by class): what DATASET_STATS does not list."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in range(0, len(dataset), max(1, len(dataset) // limit)):
        pixels = TF.pil_to_tensor(dataset[i][0]).flatten(1).double() / 255  # (3, H*W)
        total += pixels.sum(1)
        total_sq += (pixels ** 2).sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (total_sq / count - mean ** 2).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# Tables of class names

# The names the released SIT code puts in its Tiny-ImageNet prompts (CLIP's curated ImageNet names,
# not words.txt's), in wnids.txt order: what --class-names raw uses for this dataset.
TINYIMAGENET_RELEASED_NAMES = tuple((
    "Egyptian Mau, fishing casting reel, volleyball, rocking chair, lemon, American bullfrog, "
    "basketball, cliff, espresso, plunger, parking meter, German Shepherd Dog, dining table, "
    "monarch butterfly, brown bear, school bus, pizza, guinea pig, umbrella, pipe organ, oboe, "
    "maypole, goldfish, pot pie, hourglass, beach, computer keyboard, arabian camel, ice cream, "
    "metal nail, space heater, cardigan, baboon, snail, coral reef, albatross, spider web, "
    "sea cucumber, backpack, Labrador Retriever, pretzel, king penguin, sulphur butterfly, "
    "tarantula, red panda, soda bottle, banana, sock, cockroach, missile, beer bottle, "
    "praying mantis, freight car, guacamole, remote control, fire salamander, lakeshore, "
    "chimpanzee, payphone, fur coat, mountain, lampshade, torch, abacus, moving van, barrel, "
    "tabby cat, goose, koala, high-speed train, CD player, teapot, birdhouse, gazelle, "
    "academic gown, tractor, ladybug, miniskirt, Golden Retriever, triumphal arch, cannon, "
    "neck brace, sombrero, gas mask or respirator, candle, desk, frying pan, bee, dam, "
    "spiny lobster, police van, iPod, punching bag, lighthouse, jellyfish, wok, potter's wheel, "
    "sandal, pill bottle, butcher shop, slug, pig, cougar, construction crane, vestment, "
    "dragonfly, automated teller machine, mushroom, rickshaw, water tower, storage chest, snorkel, "
    "sunglasses, fly, limousine, black stork, dugong, sports car, water jug, suspension bridge, "
    "ox, popsicle, turnstile, Christmas stocking, broom, scorpion, wooden spoon, picket fence, "
    "rugby ball, sewing machine, through arch bridge, Persian cat, refrigerator, barn, apron, "
    "Yorkshire Terrier, swim trunks / shorts, stopwatch, lawn mower, thatched roof, fountain, "
    "southern black widow, bikini, plate, teddy bear, barbershop, candy store, station wagon, "
    "scoreboard, orange, flagpole, American lobster, trolleybus, drumstick, dumbbell, "
    "brass memorial plaque, bow tie, convertible, bighorn sheep, orangutan, American alligator, "
    "centipede, syringe, go-kart, brain coral, sea slug, cliff dwelling, mashed potatoes, viaduct, "
    "military uniform, pomegranate, chain, kimono, comic book, trilobite, bison, pole, "
    "boa constrictor, poncho, bathtub, grasshopper, stick insect, Chihuahua, tailed frog, lion, "
    "altar, obelisk, beaker, bell pepper, baluster / handrail, bucket, magnetic compass, meatloaf, "
    "gondola, Standard Poodle, acorn, lifeboat, binoculars, cauliflower, African bush elephant"
).split(", "))

# ImageNet-R's 200 ImageNet classes, in the order of their sorted WordNet ids
IMAGENET_R_CLASSES = tuple((
    "goldfish, great white shark, hammerhead, stingray, hen, ostrich, goldfinch, junco, "
    "bald eagle, vulture, newt, axolotl, tree frog, iguana, African chameleon, cobra, scorpion, "
    "tarantula, centipede, peacock, lorikeet, hummingbird, toucan, duck, goose, black swan, koala, "
    "jellyfish, snail, lobster, hermit crab, flamingo, american egret, pelican, king penguin, "
    "grey whale, killer whale, sea lion, chihuahua, shih tzu, afghan hound, basset hound, beagle, "
    "bloodhound, italian greyhound, whippet, weimaraner, yorkshire terrier, boston terrier, "
    "scottish terrier, west highland white terrier, golden retriever, labrador retriever, "
    "cocker spaniels, collie, border collie, rottweiler, german shepherd dog, boxer, "
    "french bulldog, saint bernard, husky, dalmatian, pug, pomeranian, chow chow, "
    "pembroke welsh corgi, toy poodle, standard poodle, timber wolf, hyena, red fox, tabby cat, "
    "leopard, snow leopard, lion, tiger, cheetah, polar bear, meerkat, ladybug, fly, bee, ant, "
    "grasshopper, cockroach, mantis, dragonfly, monarch butterfly, starfish, wood rabbit, "
    "porcupine, fox squirrel, beaver, guinea pig, zebra, pig, hippopotamus, bison, gazelle, llama, "
    "skunk, badger, orangutan, gorilla, chimpanzee, gibbon, baboon, panda, eel, clown fish, "
    "puffer fish, accordion, ambulance, assault rifle, backpack, barn, wheelbarrow, basketball, "
    "bathtub, lighthouse, beer glass, binoculars, birdhouse, bow tie, broom, bucket, cauldron, "
    "candle, cannon, canoe, carousel, castle, mobile phone, cowboy hat, electric guitar, "
    "fire engine, flute, gasmask, grand piano, guillotine, hammer, harmonica, harp, hatchet, jeep, "
    "joystick, lab coat, lawn mower, lipstick, mailbox, missile, mitten, parachute, pickup truck, "
    "pirate ship, revolver, rugby ball, sandal, saxophone, school bus, schooner, shield, "
    "soccer ball, space shuttle, spider web, steam locomotive, scarf, submarine, tank, "
    "tennis ball, tractor, trombone, vase, violin, military aircraft, wine bottle, ice cream, "
    "bagel, pretzel, cheeseburger, hotdog, cabbage, broccoli, cucumber, bell pepper, mushroom, "
    "Granny Smith, strawberry, lemon, pineapple, banana, pomegranate, pizza, burrito, espresso, "
    "volcano, baseball player, scuba diver, acorn"
).split(", "))
