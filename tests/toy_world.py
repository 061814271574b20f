"""
A toy world in which a CLIP pretrained on a laptop has zero-shot ability to keep or lose
(tests/toy_study.py runs the paper's comparison in it).

Each image is one of eight shapes filled with one of eight textures; a class is a (texture, shape)
composition, named e.g. "checked triangle". Position, size, colours and noise are drawn per image,
independently of the class; textures are dark marks on a colour, so AutoAugment's colour operations,
rotations and flips keep the class. The 64 compositions fall into eight groups of eight by
(shape + texture rank) mod 8, each group a Latin square row (every shape and every texture once);
the world seed shuffles the textures' ranks. Four groups are pretrained on, three are the stream
(24 classes), one is held out (never streamed, only used for zero-shot transfer): stream and
held-out names are unseen pairings of seen words. Pretraining and held-out images are clean (a light
background, upright); stream images carry one systematic shift that the pretrained model has never
seen and the image tower can learn to undo: a dark background, and a quarter turn (stripes become
bars; triangles, domes, bowls and hourglasses lie on their side). AutoAugment's operations keep it:
an inverted stream image has light marks, and its rotations are at most 30 degrees. Pretraining
crops and flips as the stream does, so that tuning on the stream's augmented images teaches the
model its classes.
Method, settings and results: docs/toy_study.md.
"""

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_model  # noqa: E402
import stream  # noqa: E402

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "dome", "bowl", "hourglass")
TEXTURES = ("plain", "striped", "barred", "checked", "dotted", "grid", "ringed", "framed")
GROUPS = {"pretrain": (0, 1, 2, 3), "stream": (4, 5, 6), "heldout": (7,)}  # (shape + rank) mod 8
SIZE = 32
CAPTIONS = ("a photo of a {}.", "a bad photo of a {}.", "a {}.", "a picture of a {}.",
            "a drawing of a {}.")


def classes(group, world=0):
    """The (texture, shape) compositions of a group in world `world`, in a fixed order."""
    g = torch.Generator().manual_seed(world)
    rank = torch.randperm(len(TEXTURES), generator=g).tolist()  # texture -> its rank in this world
    n = len(SHAPES)
    return [(t, s) for s in range(n) for t in range(n) if (s + rank[t]) % n in GROUPS[group]]


def class_name(texture, shape):
    return f"{TEXTURES[texture]} {SHAPES[shape]}"


def _mask(shape, dx, dy):
    """Shape `shape` on coordinates relative to its centre, in units of its radius (y down)."""
    name = SHAPES[shape]
    if name == "circle":
        return dx ** 2 + dy ** 2 <= 1
    if name == "square":
        return torch.maximum(dx.abs(), dy.abs()) <= 0.8
    if name == "triangle":  # apex up, so a horizontal flip keeps it
        return (dy >= -1) & (dy <= 0.8) & (dx.abs() <= 0.53 * (dy + 1))
    if name == "diamond":
        return dx.abs() + dy.abs() <= 1
    if name == "cross":
        return ((dx.abs() <= 0.33) & (dy.abs() <= 1)) | ((dy.abs() <= 0.33) & (dx.abs() <= 1))
    if name == "dome":
        return (dx ** 2 + dy ** 2 <= 1) & (dy <= 0.35)
    if name == "bowl":  # a disc less a disc above its centre: a crescent opening upwards
        return (dx ** 2 + dy ** 2 <= 1) & (dx ** 2 + (dy + 0.5) ** 2 >= 0.8 ** 2)
    return (dx.abs() <= 0.15 + 0.75 * dy.abs()) & (dy.abs() <= 0.9)  # hourglass


def _marks(texture, x, y, radius, inside):
    """Where a texture puts its marks (x, y, radius: pixel coordinates and distance from the shape's
    centre, each plus a random phase; inside: the shape's mask)."""
    name = TEXTURES[texture]
    if name == "plain":
        return torch.zeros_like(inside)
    if name == "striped":
        return (y // 2) % 2 == 0
    if name == "barred":
        return (x // 2) % 2 == 0
    if name == "checked":
        return (x // 2 + y // 2) % 2 == 0
    if name == "grid":
        return (x % 4 == 0) | (y % 4 == 0)
    if name == "dotted":
        return (x % 5 < 2) & (y % 5 < 2)
    if name == "ringed":  # concentric about the shape's centre
        return radius.floor() % 4 < 2
    outside = (~inside).float().view(1, 1, SIZE, SIZE)  # framed: a 2-pixel band along the edge
    return F.max_pool2d(outside, 5, stride=1, padding=2).view(SIZE, SIZE) > 0


def render(texture, shape, shifted, g):
    """One (3, SIZE, SIZE) uint8 image of a (texture, shape), nuisances drawn from generator g."""
    u = lambda lo, hi, *size: lo + (hi - lo) * torch.rand(size or (), generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    r = u(8.5, 12.5)
    cx, cy = u(12.5, 19.5), u(12.5, 19.5)
    inside = _mask(shape, (xx - cx) / r, (yy - cy) / r)
    phase = torch.randint(0, 20, (2,), generator=g)
    radius = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() + phase[0] % 4
    marks = _marks(texture, xx + phase[0], yy + phase[1], radius, inside) & inside
    colour = u(0.25, 1.0, 3, 1, 1)
    background = u(0.75, 0.95, 1, 1, 1) * u(0.9, 1.0, 3, 1, 1)  # light, nearly grey
    if shifted:  # the stream's shift, the same for every image: a dark background
        background = u(0.05, 0.25, 1, 1, 1) * u(0.9, 1.0, 3, 1, 1)
    image = torch.where(inside, colour, background)
    image = torch.where(marks, 0.05, image)
    image = image + 0.03 * torch.randn(3, SIZE, SIZE, generator=g)
    if shifted:  # and turned by a quarter: stripes become bars, triangles lie on their side
        image = image.rot90(1, dims=(1, 2))
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def images(group, per_class, shifted, seed, world=0):
    """(N, 3, SIZE, SIZE) uint8 images and (N,) class indices into classes(group, world): per_class
    of each class."""
    comps = classes(group, world)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(comps)).repeat(per_class)
    return torch.stack([render(*comps[c], shifted, g) for c in labels.tolist()]), labels


SOURCE = open(__file__).read()  # as imported: an edit while a study runs changes no cache name


def _digest(settings):
    """Names what is made from these settings by this file's code: a change to either remakes it."""
    text = json.dumps(settings, sort_keys=True) + SOURCE
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_folders(root, seed=0, n_train=100, n_test=50):
    """The image folders of world `seed` that the project reads, n_train and n_test images per
    class: ROOT/stream/{train,test}/<class>/*.png (shifted images of the stream classes) and
    ROOT/heldout/{train,test}/<class>/*.png (clean images of the held-out classes; only the test
    split is read). Folder names use underscores ("checked_triangle"), which the default recipe
    reads as spaces. Kept when already written."""
    done = os.path.join(root, "done.json")
    settings = _digest({"seed": seed, "n_train": n_train, "n_test": n_test})
    if os.path.isfile(done) and json.load(open(done)) == settings:
        return root
    for k, (group, shifted) in enumerate((("stream", True), ("heldout", False))):
        shutil.rmtree(os.path.join(root, group), ignore_errors=True)  # an older world's classes
        comps = classes(group, seed)
        for j, (split, n) in enumerate((("train", n_train), ("test", n_test))):
            pixels, labels = images(group, n, shifted, 1000 * seed + 10 * k + j, world=seed)
            for i, (image, c) in enumerate(zip(pixels, labels.tolist())):
                folder = os.path.join(root, group, split, class_name(*comps[c]).replace(" ", "_"))
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, f"{i:05d}.png")
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    json.dump(settings, open(done, "w"))
    return root


# ----------------------------------------------------------------------------------------------
# pretraining: CLIP's contrastive loss on (image, caption) pairs of the pretraining classes


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 1200           # pre-registered on tuning worlds (docs/toy_study.md)
    batch_size: int = 128
    lr: float = 2e-3
    per_class: int = 500        # clean images of each pretraining class, drawn once
    width: int = 64             # both towers; heads = width // 64, as build_model infers them
    layers: int = 2
    patch: int = 8
    embed_dim: int = 64
    context_length: int = 40    # bytes of the longest caption or prompt + 2


def model_config(c: PretrainConfig):
    return replace(clip_model.TINY_CONFIG, embed_dim=c.embed_dim, context_length=c.context_length,
                   vocab_size=clip_model.BYTE_VOCAB_SIZE, vision_patch_size=c.patch,
                   vision_layers=c.layers, vision_width=c.width, vision_heads=c.width // 64,
                   transformer_layers=c.layers, transformer_width=c.width,
                   transformer_heads=c.width // 64)


def pretrain(c: PretrainConfig, log=print):
    """A toy CLIP trained from scratch with CLIP's symmetric contrastive loss; captions of the
    same class in a batch count as matches (soft targets): a batch holds a class several times."""
    torch.manual_seed(c.seed)
    model = clip_model.CLIP(model_config(c))
    with torch.no_grad():
        model.logit_scale.fill_(2.6593)  # log(1/0.07), CLIP's starting temperature
    pixels, labels = images("pretrain", c.per_class, False, seed=c.seed + 12345, world=c.seed)
    names = [class_name(*comp) for comp in classes("pretrain", c.seed)]
    captions = [template.format(name) for name in names for template in CAPTIONS]
    tokens = clip_model.tokenize(captions, c.context_length, vocab_size=model.config.vocab_size)
    tokens = tokens.view(len(names), len(CAPTIONS), -1)  # (class, caption template, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, c.lr, c.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(c.seed)
    augment = stream.BatchAugment(SIZE, seed=c.seed)  # the stream's crop and flip, after AutoAugment
    start = time.time()
    model.train()
    for step in range(c.steps):
        batch = torch.randint(0, len(labels), (c.batch_size,), generator=g)
        x = augment(pixels[batch])
        y = labels[batch]
        template = torch.randint(0, len(CAPTIONS), (c.batch_size,), generator=g)
        text = clip_model.trim_padding(tokens[y, template])
        f = F.normalize(model.encode_image(x), dim=-1)
        t = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * f @ t.t()  # (B, B)
        target = (y.view(-1, 1) == y.view(1, -1)).float()
        target = target / target.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if log and (step % 200 == 0 or step == c.steps - 1):
            log(f"pretrain step {step:5d}  loss {loss.item():.3f}  {time.time() - start:5.0f} s")
    return model.eval()


def model_path(c: PretrainConfig, cache_dir):
    """Where the toy CLIP pretrained with these settings by this file's code is cached."""
    return os.path.join(cache_dir, f"toy_clip_{_digest(asdict(c))}.pt")


def pretrained(c: PretrainConfig, cache_dir, log=print):
    """Path of the toy CLIP's state dict for these settings: cached in cache_dir, else trained."""
    path = model_path(c, cache_dir)
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        start = time.time()
        model = pretrain(c, log)
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        if log:
            log(f"pretrained the toy CLIP in {time.time() - start:.0f} s: {path}")
    return path


def load(path):
    """The toy CLIP saved at `path` (QuickGELU, as clip_model.CLIP builds it)."""
    return clip_model.load(path, act="quickgelu")


@torch.no_grad()
def zero_shot(model, group, shifted, world, per_class=50, seed=999):
    """Top-1 of the prompt "a bad photo of a {class}." among a group's classes, on fresh images."""
    pixels, labels = images(group, per_class, shifted, seed, world)
    g = clip_model.class_text_features(model, [class_name(*comp) for comp in classes(group, world)])
    f = F.normalize(model.encode_image(stream.normalize(pixels)), dim=-1)
    return (f @ g.t()).argmax(dim=-1).eq(labels).float().mean().item()
