"""
Bottleneck adapters for the towers of clip_model.CLIP, placed as in the paper's released code.

    Ad(h) = up(dropout(relu(down(h)))),   down: width -> bottleneck,  up: bottleneck -> width, zero at init

Each residual block gets ONE adapter, used twice (after attention and after the MLP):

    h = Attn(LN1(x));  x = x + h + scale * Ad(h)
    m = MLP(LN2(x));   x = x + m + scale * Ad(m)

Since `up` starts at zero, Ad = 0 and the tuned model starts exactly at zero-shot CLIP. The block keeps its
submodules (same objects, same OpenAI state-dict names); the new parameters are named `*.adapter.*`.
"""

import torch.nn as nn

import clip_model


class Adapter(nn.Module):
    """Ad(h) = up(dropout(relu(down(h)))), with `up` zero so that Ad starts as the zero map."""

    def __init__(self, width, bottleneck, dropout):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, width)
        # The released code's init (AdaptFormer's "lora" option): down kaiming-uniform (nn.Linear's default),
        # both biases and the up weight zero.
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.up(self.dropout(self.relu(self.down(h))))


class AdapterBlock(clip_model.ResidualAttentionBlock):
    """clip_model's residual block with one adapter applied after attention and again after the MLP."""

    def __init__(self, block: clip_model.ResidualAttentionBlock, bottleneck, scale, dropout):
        nn.Module.__init__(self)  # adopt block's submodules (same objects, same names) instead of new ones
        self.ln_1, self.attn, self.ln_2, self.mlp = block.ln_1, block.attn, block.ln_2, block.mlp
        like = self.ln_1.weight
        self.adapter = Adapter(like.shape[0], bottleneck, dropout).to(device=like.device, dtype=like.dtype)
        self.scale = scale

    def forward(self, x, attn_mask=None):
        h = self.attn(self.ln_1(x), attn_mask)
        x = x + h + self.scale * self.adapter(h)  # x + h + scale * Ad(h)
        m = self.mlp(self.ln_2(x))
        return x + m + self.scale * self.adapter(m)  # x + m + scale * Ad(m), the same adapter


def apply_adapter(model, encoder="both", bottleneck=64, scale=0.1, dropout=0.1):
    """Give every block of the chosen tower(s) an adapter and freeze everything else (in place; returns model)."""
    towers = clip_model.towers(model, encoder)
    if not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"bottleneck={bottleneck!r}; expected an integer >= 1")
    if scale == 0:
        raise ValueError(f"scale={scale!r}; expected a non-zero number (the released code uses 0.1)")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r}; expected a probability in [0, 1)")
    if any(isinstance(m, AdapterBlock) for m in model.modules()):
        raise ValueError("model already has adapters; apply_adapter once per model")
    model.requires_grad_(False)  # every CLIP weight, logit_scale included, stays frozen
    for tower in towers:
        for i, block in enumerate(tower.resblocks):
            tower.resblocks[i] = AdapterBlock(block, bottleneck, scale, dropout)
    return model


def adapter_state_dict(model):
    """Only the adapter tensors, under their model.state_dict() names (sharing storage, as state_dict does)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".adapter." in name}


def load_adapter_state_dict(model, state_dict):
    """Restore tensors saved by adapter_state_dict; refuse missing, unexpected or mis-shaped keys before copying any."""
    clip_model.load_tensors(adapter_state_dict(model), state_dict, "adapter", "encoder or bottleneck")
