"""Fixtures shared by the LoRA and adapter tests: a tiny random CLIP and one labelled batch."""

import pytest
import torch

from clip_model import CLIP, TINY_CONFIG, tokenize

CLASSES = ["cat", "dog", "fishing boat", "sunflower"]


@pytest.fixture(scope="module")
def plain():
    """A tiny random CLIP in eval mode (tests deep-copy it before tuning)."""
    torch.manual_seed(0)
    return CLIP(TINY_CONFIG).eval()


@pytest.fixture(scope="module")
def batch():
    """One image per class and the class prompts: (images, tokens, labels)."""
    images = torch.randn(len(CLASSES), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tokenize([f"a bad photo of a {c}." for c in CLASSES])
    return images, tokens, torch.arange(len(CLASSES))
