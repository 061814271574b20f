"""
A toy world in which a CLIP pretrained on a laptop has zero-shot ability to keep or lose (see tests/toy_study.py).

Each image is one shape (circle, square, triangle, diamond, cross, dome) filled with one texture (plain, striped,
barred, checked, dotted, grid); a class is a (texture, shape) composition, named e.g. "checked triangle". Position,
size, colours and noise are drawn per image, independently of the class; textures are dark marks on a colour, so
AutoAugment's colour operations and flips keep the class. The 36 compositions fall into six groups of six by
(shape + texture) mod 6, each group a Latin square row (every shape and every texture once): four groups are
pretrained on, one is the stream, one is held out (never streamed, only used for zero-shot transfer): their names
are unseen pairings of seen words, which the text tower must place zero-shot (within a group either word alone
tells the classes apart). Pretraining and held-out images are clean (light plain background, little noise);
stream images are shifted (dark cluttered background, heavy noise), so the pretrained model meets the stream
below its ceiling.
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

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "dome")
TEXTURES = ("plain", "striped", "barred", "checked", "dotted", "grid")
GROUPS = {"pretrain": (0, 1, 2, 3), "stream": (4,), "heldout": (5,)}  # (shape + texture) mod 6
SIZE = 32
CAPTIONS = ("a photo of a {}.", "a bad photo of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}.")


def classes(group):
    """The (texture, shape) compositions of a group, in a fixed order."""
    return [(t, s) for s in range(len(SHAPES)) for t in range(len(TEXTURES)) if (s + t) % 6 in GROUPS[group]]


def class_name(texture, shape):
    return f"{TEXTURES[texture]} {SHAPES[shape]}"


def _mask(shape, dx, dy):
    """Shape `shape` on coordinates relative to its centre, in units of its radius."""
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
    return (dx ** 2 + dy ** 2 <= 1) & (dy <= 0.35)  # dome


def _marks(texture, x, y):
    """Where a texture puts its marks (period 4 or 5 pixels, phase already in x, y)."""
    name = TEXTURES[texture]
    if name == "plain":
        return torch.zeros_like(x, dtype=torch.bool)
    if name == "striped":
        return (y // 2) % 2 == 0
    if name == "barred":
        return (x // 2) % 2 == 0
    if name == "checked":
        return (x // 2 + y // 2) % 2 == 0
    if name == "grid":
        return (x % 4 == 0) | (y % 4 == 0)
    return (x % 5 < 2) & (y % 5 < 2)  # dotted


def render(texture, shape, shifted, g):
    """One (3, SIZE, SIZE) uint8 image of a (texture, shape) with nuisances drawn from generator g."""
    u = lambda lo, hi, *size: lo + (hi - lo) * torch.rand(size or (), generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    r = u(8.5, 12.5)
    cx, cy = u(12.5, 19.5), u(12.5, 19.5)
    inside = _mask(shape, (xx - cx) / r, (yy - cy) / r)
    phase = torch.randint(0, 20, (2,), generator=g)
    marks = _marks(texture, xx + phase[0], yy + phase[1]) & inside
    colour = u(0.25, 1.0, 3, 1, 1)
    if shifted:  # dark background of smooth colour blobs, heavy noise
        blobs = F.interpolate(u(0.0, 0.45, 1, 3, 4, 4), size=(SIZE, SIZE), mode="bicubic", align_corners=False)[0]
        background, noise = blobs, 0.12
    else:  # light plain background, light noise
        background, noise = u(0.75, 0.95, 1, 1, 1) * u(0.9, 1.0, 3, 1, 1), 0.03
    image = torch.where(inside, colour, background)
    image = torch.where(marks, 0.05, image)
    image = image + noise * torch.randn(3, SIZE, SIZE, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def images(group, per_class, shifted, seed):
    """(N, 3, SIZE, SIZE) uint8 images and (N,) class indices into classes(group): per_class of each class."""
    comps = classes(group)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(comps)).repeat(per_class)
    return torch.stack([render(*comps[c], shifted, g) for c in labels.tolist()]), labels


def _digest(settings):
    """Names what is made from these settings by this file's code: a change to either makes it anew."""
    text = json.dumps(settings, sort_keys=True) + open(__file__).read()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_folders(root, seed=0, n_train=100, n_test=30):
    """The image folders the project reads: ROOT/stream/{train,test}/<class>/*.png (shifted images of the stream
    classes) and ROOT/heldout/{train,test}/<class>/*.png (clean images of the held-out classes). Folder names use
    underscores ("checked_triangle"), which the default recipe reads as spaces. Kept when already written."""
    done = os.path.join(root, "done.json")
    settings = _digest({"seed": seed, "n_train": n_train, "n_test": n_test})
    if os.path.isfile(done) and json.load(open(done)) == settings:
        return root
    for k, (group, shifted) in enumerate((("stream", True), ("heldout", False))):
        shutil.rmtree(os.path.join(root, group), ignore_errors=True)  # an older world's classes
        comps = classes(group)
        for j, (split, n) in enumerate((("train", n_train), ("test", n_test))):
            pixels, labels = images(group, n, shifted, seed=1000 * seed + 10 * k + j)
            for i, (image, c) in enumerate(zip(pixels, labels.tolist())):
                folder = os.path.join(root, group, split, class_name(*comps[c]).replace(" ", "_"))
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:05d}.png"))
    json.dump(settings, open(done, "w"))
    return root


# -----------------------------------------------------------------------------
# pretraining: CLIP's contrastive loss on (image, caption) pairs of the pretraining classes


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    per_class: int = 500        # clean images of each pretraining class, drawn once
    width: int = 64             # both towers; heads = width // 64, as build_model infers them
    layers: int = 2
    patch: int = 8
    embed_dim: int = 64
    context_length: int = 40    # bytes of the longest caption or prompt + 2


def model_config(c: PretrainConfig):
    return replace(clip_model.TINY_CONFIG, embed_dim=c.embed_dim, vision_layers=c.layers, vision_width=c.width,
                   vision_patch_size=c.patch, vision_heads=c.width // 64, context_length=c.context_length,
                   vocab_size=clip_model.BYTE_VOCAB_SIZE, transformer_width=c.width, transformer_heads=c.width // 64,
                   transformer_layers=c.layers)


def normalize(pixels):
    mean = torch.tensor(clip_model.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip_model.CLIP_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def pretrain(c: PretrainConfig, log=print):
    """A toy CLIP trained from scratch with CLIP's symmetric contrastive loss; captions of the same class in a batch
    count as matches (soft targets), since the world has few classes and a batch holds each many times."""
    torch.manual_seed(c.seed)
    model = clip_model.CLIP(model_config(c))
    with torch.no_grad():
        model.logit_scale.fill_(2.6593)  # log(1/0.07), CLIP's starting temperature
    pixels, labels = images("pretrain", c.per_class, shifted=False, seed=c.seed + 12345)
    names = [class_name(*comp) for comp in classes("pretrain")]
    captions = [template.format(name) for name in names for template in CAPTIONS]
    tokens = clip_model.tokenize(captions, c.context_length, vocab_size=model.config.vocab_size)
    tokens = tokens.view(len(names), len(CAPTIONS), -1)  # (class, caption template, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, c.lr, total_steps=c.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(c.seed)
    start = time.time()
    model.train()
    for step in range(c.steps):
        batch = torch.randint(0, len(labels), (c.batch_size,), generator=g)
        x = normalize(pixels[batch])
        flip = torch.rand(c.batch_size, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
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


def pretrained(c: PretrainConfig, cache_dir, log=print):
    """Path of the toy CLIP's state dict for these settings: read from cache_dir if made before, else trained."""
    digest = _digest(asdict(c))
    path = os.path.join(cache_dir, f"toy_clip_{digest}.pt")
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        start = time.time()
        model = pretrain(c, log)
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        if log:
            log(f"pretrained the toy CLIP in {time.time() - start:.0f} s: {path}")
    return path


@torch.no_grad()
def zero_shot(model, group, shifted, per_class=50, seed=999):
    """Top-1 of the prompt "a bad photo of a {class}." over a group's classes, on fresh images of that group."""
    pixels, labels = images(group, per_class, shifted, seed)
    g = clip_model.class_text_features(model, [class_name(*comp) for comp in classes(group)])
    f = F.normalize(model.encode_image(normalize(pixels)), dim=-1)
    return (f @ g.t()).argmax(dim=-1).eq(labels).float().mean().item()
