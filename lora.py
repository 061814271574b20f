"""
LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models") for the towers of clip_model.CLIP.
A frozen linear map y = W x + b is tuned as

    y = W x + b + (alpha / r) * B A x,    A: (r, in) random,  B: (out, r) zero,

so only A and B train, and B A = 0 at first: the tuned model starts exactly at zero-shot CLIP. `apply_lora` puts
this on the q, k, v rows of each block's fused attention input projection (`in_proj_weight`), on its output
projection (`out_proj`), and optionally on the MLP. The original parameters keep their objects and OpenAI
state-dict names; the new ones are named `*lora_A`, `*lora_B`.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_model

TARGETS = ("q", "k", "v", "out")
INITS = ("zero", "released")

# ---- LoRA modules --------------------------------------------------------------------------------


def init_lora_(A, B, init="zero"):
    """A as loralib (kaiming-uniform, nn.Linear's default) and B = 0; or, with init="released", both xavier-uniform
    as the released code draws its q/k/v update (about 1e-3 per entry: step 0 is then not zero-shot CLIP)."""
    if init == "released":
        nn.init.xavier_uniform_(A)
        nn.init.xavier_uniform_(B)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank path: y = W x + b + (alpha/r) B A dropout(x)."""

    def __init__(self, linear: nn.Linear, r, alpha, dropout=0.0):
        nn.Module.__init__(self)  # adopt linear's weight and bias (same objects, same names) instead of new ones
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.lora_A = nn.Parameter(self.weight.new_empty(r, self.in_features))
        self.lora_B = nn.Parameter(self.weight.new_empty(self.out_features, r))
        init_lora_(self.lora_A, self.lora_B)
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # x -> A x -> B A x: two thin matmuls, never the (out, in) matrix B A; the scaling acts on the r-wide A x
        return y + F.linear(self.scaling * F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)


class LoRAAttention(clip_model.Attention):
    """clip_model.Attention whose fused projection gets a low-rank update on its q, k and/or v rows."""

    def __init__(self, attn: clip_model.Attention, slots, r, alpha, dropout=0.0, init="zero"):
        nn.Module.__init__(self)  # adopt attn's parameters and out_proj (same objects, same names)
        self.heads = attn.heads
        self.in_proj_weight, self.in_proj_bias, self.out_proj = attn.in_proj_weight, attn.in_proj_bias, attn.out_proj
        width = self.in_proj_weight.shape[1]
        # As in the released code: ONE rank-r update of the fused projection, i.e. q, k and v share A and each
        # targeted slot has its own rows of B (4 r width parameters for q, k, v, not 3 x 2 r width).
        self.lora_A = nn.Parameter(self.in_proj_weight.new_empty(r, width))
        self.lora_B = nn.Parameter(self.in_proj_weight.new_empty(len(slots) * width, r))  # targeted slots stacked
        init_lora_(self.lora_A, self.lora_B, init)
        self.register_buffer("lora_slots", torch.tensor(slots, device=self.lora_A.device), persistent=False)
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def placed_B(self):
        """B with zero rows for the slots LoRA does not target: (3*width, r), rows of q, k, v in order."""
        n, r = len(self.lora_slots), self.lora_B.shape[1]
        placed = self.lora_B.new_zeros(3, self.lora_B.shape[0] // n, r)
        return placed.index_copy(0, self.lora_slots, self.lora_B.view(n, -1, r)).flatten(0, 1)

    def in_proj(self, x):
        """[q, k, v] = W_qkv x + b_qkv + (alpha/r) B A x, B zero on the untargeted slots."""
        qkv = super().in_proj(x)  # (B, T, 3*width)
        if self.merged:
            return qkv
        return qkv + F.linear(self.scaling * F.linear(self.lora_dropout(x), self.lora_A), self.placed_B())


# ---- applying, merging, saving -------------------------------------------------------------------


def lora_modules(model):
    """Every LoRA module in the model."""
    return [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAAttention))]


def apply_lora(model, encoder="both", r=4, alpha=1.0, targets=TARGETS, dropout=0.0, mlp=False, init="zero"):
    """Add LoRA to every block of the chosen tower(s) and freeze everything else (in place; returns model)."""
    towers = clip_model.towers(model, encoder)
    if isinstance(targets, str) or not set(targets) <= set(TARGETS) or not (targets or mlp):
        raise ValueError(f"targets={targets!r} with mlp={mlp}; expected a tuple of names from {TARGETS}, e.g. "
                         "('q', 'v'), empty only with mlp=True")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r}; expected an integer rank >= 1")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r}; expected a number > 0 (the update is scaled by alpha/r)")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r}; expected a probability in [0, 1)")
    if init not in INITS:
        raise ValueError(f"init={init!r}; expected one of {INITS}")
    if lora_modules(model):
        raise ValueError("model already has LoRA modules; apply_lora once per model")
    model.requires_grad_(False)  # every CLIP weight, logit_scale included, stays frozen
    slots = [i for i, name in enumerate(("q", "k", "v")) if name in targets]
    for tower in towers:
        for block in tower.resblocks:
            if slots:
                block.attn = LoRAAttention(block.attn, slots, r, alpha, dropout, init)
            if "out" in targets:
                block.attn.out_proj = LoRALinear(block.attn.out_proj, r, alpha, dropout)
            if mlp:
                block.mlp.c_fc = LoRALinear(block.mlp.c_fc, r, alpha, dropout)
                block.mlp.c_proj = LoRALinear(block.mlp.c_proj, r, alpha, dropout)
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every update into its frozen weight, W <- W + (alpha/r) B A, for inference (outputs unchanged)."""
    # Explicit, never on .eval() as in loralib: there a checkpoint saved in eval mode holds merged weights, and
    # loading it under LoRA counts the update twice.
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA modules; nothing to merge (call apply_lora first)")
    for m in modules:
        if not m.merged:
            W, B = (m.in_proj_weight, m.placed_B()) if isinstance(m, LoRAAttention) else (m.weight, m.lora_B)
            W += (B @ m.lora_A * m.scaling).to(W.dtype)
            m.merged = True
    return model


def lora_state_dict(model):
    """Only the LoRA tensors, under their model.state_dict() names (sharing storage, as state_dict does)."""
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}


def load_lora_state_dict(model, state_dict):
    """Restore tensors saved by lora_state_dict; refuse missing, unexpected or mis-shaped keys before copying any."""
    if any(m.merged for m in lora_modules(model)):
        raise ValueError("model's LoRA updates are merged into its weights; load into an unmerged model")
    clip_model.load_tensors(lora_state_dict(model), state_dict, "LoRA", "encoder, targets, mlp or r")


def count_trainable(model) -> int:
    """Number of parameters an optimizer would update (requires_grad=True)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
