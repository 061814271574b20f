"""Helpers shared by tests/test_lora.py and tests/test_adapter.py: features, a CLIP loss, a few AdamW steps."""

import torch
import torch.nn.functional as F


def features(model, batch):
    """Image and text features in eval mode (no dropout); the model's mode is left as it was."""
    images, tokens, _ = batch
    was_training = model.training
    with torch.no_grad():
        out = model.eval().encode_image(images), model.encode_text(tokens)
    model.train(was_training)
    return out


def clip_loss(model, batch):
    """Cross-entropy of image-to-prompt logits, so that the gradient reaches both towers."""
    images, tokens, labels = batch
    logits_per_image, _ = model(images, tokens)
    return F.cross_entropy(logits_per_image, labels)


def train(model, batch, steps):
    """`steps` AdamW steps on clip_loss; returns the model."""
    # Every parameter goes to AdamW with weight decay: a frozen one would move if it ever got a gradient.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        clip_loss(model, batch).backward()
        optimizer.step()
    return model
