"""
Bottleneck adapters for a CLIP in OpenAI's layout (clip_model.CLIP, OpenAI's `clip` package, open_clip's CLIP),
placed as in the paper's released code. It needs only torch: copy this file into your code.

    Ad(h) = up(dropout(relu(down(h)))),   down: width -> bottleneck,  up: bottleneck -> width, zero at init

Each residual block gets ONE adapter, used twice (after attention and after the MLP):

    h = Attn(LN1(x));  x = x + h + scale * Ad(h)
    m = MLP(LN2(x));   x = x + m + scale * Ad(m)

Since `up` starts at zero, Ad = 0 and the tuned model starts exactly at zero-shot CLIP. The adapter is the block's
submodule `adapter` (its parameters are named `*.adapter.*`), applied by forward hooks on `block.attn` and `block.mlp`
(h -> h + scale * Ad(h)); the block and its submodules are unchanged (same objects, same OpenAI state-dict names).
"""

import torch
import torch.nn as nn


class Adapter(nn.Module):
    """Ad(h) = up(dropout(relu(down(h)))), with `up` zero so that Ad starts as the zero map."""

    def __init__(self, width, bottleneck, scale, dropout):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, width)
        self.scale = scale
        # The released code's init (AdaptFormer's "lora" option): down kaiming-uniform (nn.Linear's default),
        # both biases and the up weight zero.
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.up(self.dropout(self.relu(self.down(h))))

    def add_to_output(self, module, inputs, output):
        """Forward hook on block.attn and block.mlp: h -> h + scale * Ad(h) (nn.MultiheadAttention returns (h, _))."""
        h = output[0] if isinstance(output, tuple) else output
        h = h + self.scale * self(h)
        return (h, *output[1:]) if isinstance(output, tuple) else h


def towers(model, encoder):
    """The residual blocks of the image tower, the text tower or both; a ValueError naming what differs from
    OpenAI's layout (model.visual.transformer.resblocks, model.transformer.resblocks; blocks with attn and mlp)."""
    encoders = ("image", "text", "both")
    if encoder not in encoders:
        raise ValueError(f"encoder={encoder!r}; expected one of {encoders}")
    names = {"image": ["visual.transformer"], "text": ["transformer"]}.get(encoder, ["visual.transformer", "transformer"])
    blocks = []
    for name in names:
        resblocks = model
        for part in (name + ".resblocks").split("."):
            if not isinstance(getattr(resblocks, part, None), nn.Module):
                children = [n for n, _ in resblocks.named_children()]
                raise ValueError(f"{type(model).__name__} has no {name}.resblocks ({type(resblocks).__name__} has "
                                 f"{children}): expected a CLIP in OpenAI's layout (clip_model, OpenAI's clip, "
                                 f"open_clip), its {encoder} tower at {name}.resblocks")
            resblocks = getattr(resblocks, part)
        for i, block in enumerate(resblocks):
            found = {n: type(getattr(block, n, None)).__name__ for n in ("ln_1", "attn", "ln_2", "mlp")}
            if not all(isinstance(getattr(block, n, None), nn.Module) for n in found):
                raise ValueError(f"{name}.resblocks.{i} has {found}: expected modules ln_1, attn, ln_2, mlp")
            blocks.append(block)
    return blocks


def apply_adapter(model, encoder="both", bottleneck=64, scale=0.1, dropout=0.1):
    """Give every block of the chosen tower(s) an adapter and freeze everything else (in place; returns model).

    model: a CLIP in OpenAI's layout (clip_model.CLIP, OpenAI's `clip` model, open_clip's CLIP; towers at
        model.visual.transformer.resblocks and model.transformer.resblocks); anything else is refused, unchanged.
    encoder: "image", "text" or "both", the tower(s) to tune.
    bottleneck: the adapter's hidden width (width -> bottleneck -> width).
    scale: the factor on Ad(h) (the released code's 0.1).
    dropout: inside the adapter, in training mode only.
    """
    if not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"bottleneck={bottleneck!r}; expected an integer >= 1")
    if scale == 0:
        raise ValueError(f"scale={scale!r}; expected a non-zero number (the released code uses 0.1)")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r}; expected a probability in [0, 1)")
    if any(isinstance(m, Adapter) for m in model.modules()):
        raise ValueError("model already has adapters; apply_adapter once per model")
    blocks = towers(model, encoder)  # checked before anything changes
    model.requires_grad_(False)  # every CLIP weight, logit_scale included, stays frozen
    for block in blocks:
        like = block.ln_1.weight  # (width,)
        block.adapter = Adapter(like.shape[0], bottleneck, scale, dropout).to(like.device, like.dtype)
        block.attn.register_forward_hook(block.adapter.add_to_output)
        block.mlp.register_forward_hook(block.adapter.add_to_output)
    return model


def adapter_state_dict(model):
    """Only the adapter tensors, under their model.state_dict() names (sharing storage, as state_dict does)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".adapter." in name}


def load_adapter_state_dict(model, state_dict):
    """Restore tensors saved by adapter_state_dict; refuse missing, unexpected or mis-shaped keys before copying any."""
    own = adapter_state_dict(model)
    if not own:
        raise ValueError("the model has no adapters; add them with apply_adapter and the saved settings first")
    for name in sorted(own.keys() | state_dict.keys()):
        got = tuple(getattr(state_dict[name], "shape", ())) if name in state_dict else "absent"
        want = tuple(own[name].shape) if name in own else "absent"
        if got != want:
            raise ValueError(f"adapter state dict: {name!r} saved: {got}, in the model: {want} (saved with other "
                             "encoder or bottleneck?)")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            own[name].copy_(tensor)
