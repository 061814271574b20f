"""
Bottleneck adapters for a CLIP in OpenAI's layout (clip_model's, OpenAI's `clip`, open_clip's),
placed as in the paper's released code. Needs only torch.

    Ad(h) = up(dropout(relu(down(h)))),   down: width -> bottleneck,  up: bottleneck -> width

Each residual block gets ONE adapter, used twice (after attention and after the MLP):

    h = Attn(LN1(x));  x = x + h + scale * Ad(h)
    m = MLP(LN2(x));   x = x + m + scale * Ad(m)

Since `up` starts at zero, the tuned model starts at zero-shot CLIP. The adapter is `block.adapter`
(parameters `*.adapter.*`, fp32 on an fp16/bf16 model, used in the input's dtype), applied by
forward hooks on `block.attn` and `block.mlp`, so no OpenAI state-dict name changes.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Adapter(nn.Module):
    """Ad(h) = up(dropout(relu(down(h)))), with `up` zero so that Ad starts as the zero map."""

    def __init__(self, width, bottleneck, scale, dropout):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, width)
        self.scale = scale
        # The released code's init (AdaptFormer's "lora" option): down's weight as nn.Linear's
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        if torch.is_autocast_enabled(h.device.type):  # autocast casts, once per region (as before)
            return self.up(self.dropout(self.relu(self.down(h))))
        down, up = [(m.weight.to(h.dtype), m.bias.to(h.dtype)) for m in (self.down, self.up)]
        return F.linear(self.dropout(self.relu(F.linear(h, *down))), *up)  # in h's dtype

    def add_to_output(self, module, inputs, output):
        """The forward hook on block.attn and block.mlp (twice per block): h -> h + scale * Ad(h).
        nn.MultiheadAttention returns (h, weights): h is replaced."""
        h = output[0] if isinstance(output, tuple) else output
        h = h + self.scale * self(h)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def extra_repr(self):
        return f"scale={self.scale}, used twice: after attn and after mlp"


def tower_blocks(model, encoder):
    """The residual blocks of the chosen tower(s); a ValueError naming what differs from OpenAI's
    CLIP layout."""
    if encoder not in ("image", "text", "both"):
        raise ValueError(f"encoder={encoder!r}; expected one of ('image', 'text', 'both')")
    paths = {"image": ["visual.transformer.resblocks"], "text": ["transformer.resblocks"]}
    blocks = []
    for path in paths.get(encoder, paths["image"] + paths["text"]):
        try:
            blocks += list(model.get_submodule(path))
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise ValueError(f"{type(model).__name__} has no {path} (its children: {children}); "
                             "expected a CLIP in OpenAI's layout: clip_model's, OpenAI's `clip`, "
                             "open_clip's (for CoCa: encoder='image')") from None
    for block in blocks:
        if not all(isinstance(getattr(block, n, None), nn.Module) for n in ("ln_1", "attn", "mlp")):
            raise ValueError(f"a block is a {type(block).__name__}: expected modules ln_1, attn and "
                             "mlp in each")
    return blocks


def apply_adapter(model, encoder="both", bottleneck=64, scale=0.1, dropout=0.1):
    """Give every block of the chosen tower(s) an adapter, freeze all else but LoRA (in place;
    returns model).

    model: a CLIP in OpenAI's layout (visual.transformer.resblocks, transformer.resblocks);
        anything else is refused unchanged.
    encoder: "image", "text" or "both"; bottleneck: the adapter's hidden width.
    scale: the factor on Ad(h); dropout: inside the adapter, in training.
    """
    if not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"bottleneck={bottleneck!r}; expected an integer >= 1")
    if scale == 0:
        raise ValueError(f"scale={scale!r}; expected a non-zero number (released: 0.1)")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r}; expected a probability in [0, 1)")
    if any(isinstance(m, Adapter) for m in model.modules()):
        raise ValueError("model already has adapters; apply_adapter once per model")
    blocks = tower_blocks(model, encoder)  # checked before anything changes
    for name, p in model.named_parameters():  # CLIP frozen, logit_scale too; lora.py's kept
        p.requires_grad_(p.requires_grad and "lora_" in name)
    for block in blocks:
        width, device = block.ln_1.weight.shape[0], block.ln_1.weight.device
        block.adapter = Adapter(width, bottleneck, scale, dropout).to(device).train(block.training)
        block.attn.register_forward_hook(block.adapter.add_to_output)  # x + h + scale * Ad(h)
        block.mlp.register_forward_hook(block.adapter.add_to_output)  # x + m + scale * Ad(m)
    return model


def adapter_state_dict(model):
    """Only the adapter tensors, under their model.state_dict() names (sharing storage)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".adapter." in name}


def load_adapter_state_dict(model, state_dict):
    """Restore tensors saved by adapter_state_dict; refuse missing, unexpected or mis-shaped keys
    before copying any."""
    own = adapter_state_dict(model)
    for name in sorted(own.keys() | state_dict.keys()):
        got = tuple(getattr(state_dict[name], "shape", ())) if name in state_dict else "absent"
        want = tuple(own[name].shape) if name in own else "absent"
        if got != want:
            raise ValueError(f"adapter state dict: {name!r} saved: {got}, in the model: {want} "
                             "(saved with other encoder or bottleneck?)")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            own[name].copy_(tensor)
