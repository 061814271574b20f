"""
LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models") for a CLIP in OpenAI's
layout: clip_model's, OpenAI's `clip`, open_clip's. Needs only torch. A frozen linear map
y = W x + b is tuned as

    y = W x + b + (alpha / r) * B A x,    A: (r, in) random,  B: (out, r) zero,

so only A and B train, and B A = 0 at first: the tuned model starts at zero-shot CLIP.
`apply_lora` puts this on the q, k, v rows of each block's fused attention input projection
(`in_proj_weight`), on its output projection (`out_proj`), and optionally on the MLP. Frozen
parameters keep their objects and OpenAI state-dict names; the new ones are `*lora_A`, `*lora_B`,
fp32 on an fp16/bf16 model (AdamW's eps is 0 in fp16), used in the input's dtype. A tuned block's
`attn` becomes a LoRAAttention holding the same parameters and computing the attention itself
(nn.MultiheadAttention reads out_proj.weight, never calls out_proj).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ENCODERS = ("image", "text", "both")
TARGETS = ("q", "k", "v", "out")
INITS = ("zero", "released")

# ---- LoRA modules ----


def init_lora_(A, B, init="zero"):
    """B = 0 and A as loralib (nn.Linear's default); or, init="released", both xavier-uniform as the
    released code draws its q/k/v update (step 0 is then not zero-shot CLIP)."""
    if init == "released":
        nn.init.xavier_uniform_(A)
        nn.init.xavier_uniform_(B)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank path: y = W x + b + (alpha/r) B A dropout(x)."""

    def __init__(self, linear: nn.Linear, r, alpha, dropout=0.0):
        nn.Module.__init__(self)  # adopt linear's weight and bias (same objects, same names)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.lora_A = nn.Parameter(self.weight.new_empty(r, self.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(self.lora_A.new_empty(self.out_features, r))
        init_lora_(self.lora_A, self.lora_B)
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.train(linear.training)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # x -> A x -> B A x: two thin matmuls, never the (out, in) matrix B A; scaled while r wide
        Ax = self.scaling * F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        return y + F.linear(Ax, self.lora_B.to(x.dtype))


class LoRAAttention(nn.Module):
    """A block's self-attention (its parameters adopted), LoRA on the q, k and/or v rows of in_proj;
    called as the module it replaces."""

    def __init__(self, attn, slots, r, alpha, dropout=0.0, init="zero"):
        super().__init__()
        self.mha = isinstance(attn, nn.MultiheadAttention)
        self.heads = attn.num_heads if self.mha else attn.heads
        self.batch_first = getattr(attn, "batch_first", True)
        self.in_proj_weight = attn.in_proj_weight
        self.in_proj_bias = attn.in_proj_bias
        self.out_proj = attn.out_proj
        width = self.in_proj_weight.shape[1]
        self.slots = slots
        for name in [n for n in vars(attn) if n.startswith("_forward")]:  # attn's (pre-)hooks,
            setattr(self, name, getattr(attn, name))  # adapter.py's among them, act here too
        # As released: ONE rank-r update of the fused projection, so q, k and v share A and each
        # targeted slot has its own rows of B (4 r width parameters for q, k, v, not 3 x 2 r width).
        if slots:
            self.lora_A = nn.Parameter(self.in_proj_weight.new_empty(r, width, dtype=torch.float32))
            self.lora_B = nn.Parameter(self.lora_A.new_empty(len(slots) * width, r))
            init_lora_(self.lora_A, self.lora_B, init)
            slot_ids = torch.tensor(slots, device=self.lora_A.device)
            self.register_buffer("lora_slots", slot_ids, persistent=False)
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.train(attn.training)

    def placed_B(self):
        """B with zero rows for the slots LoRA does not target: (3*width, r), q, k, v rows in order."""
        n, r = len(self.slots), self.lora_B.shape[1]
        placed = self.lora_B.new_zeros(3, self.lora_B.shape[0] // n, r)
        return placed.index_copy(0, self.lora_slots, self.lora_B.view(n, -1, r)).flatten(0, 1)

    def in_proj(self, x):
        """[q, k, v] = W_qkv x + b_qkv + (alpha/r) B A x, B zero on untargeted slots: (N, T, 3*width)."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if not self.slots or self.merged:
            return qkv
        Ax = self.scaling * F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (N, T, r)
        return qkv + F.linear(Ax, self.placed_B().to(x.dtype))

    def forward(self, x, key=None, value=None, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if self.mha:
            self_attention = key is x and value is x and not need_weights
        else:
            self_attention = key is None and value is None
        if not self_attention or key_padding_mask is not None or is_causal:
            raise ValueError("LoRAAttention computes self-attention only: attn(x, x, x, "
                             "need_weights=False, attn_mask=mask) in place of nn.MultiheadAttention, "
                             "attn(x, attn_mask=mask) otherwise")
        if self.mha and attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention's True = may not attend; SDPA's = may
        x = x if self.batch_first else x.transpose(0, 1)  # (N, T, C), from OpenAI's (T, N, C)
        N, T, C = x.shape
        qkv = self.in_proj(x).view(N, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, nh, T, hs)
        y = self.out_proj(y.transpose(1, 2).reshape(N, T, C))  # (N, T, C)
        y = y if self.batch_first else y.transpose(0, 1)
        return (y, None) if self.mha else y


# ---- applying, merging, saving ----


def lora_modules(model):
    """Every module holding LoRA tensors in the model."""
    modules = []
    for m in model.modules():
        if isinstance(m, LoRALinear) or isinstance(m, LoRAAttention) and m.slots:
            modules.append(m)
    return modules


def tower_blocks(model, encoder):
    """The residual blocks of the chosen tower(s); a ValueError naming what differs from OpenAI's
    CLIP layout."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder={encoder!r}; expected one of {ENCODERS}")
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
    for block in blocks:  # LoRAAttention must compute what block.attn does
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if isinstance(attn, nn.MultiheadAttention):  # as OpenAI's `clip` and open_clip use it
            ok = attn._qkv_same_embed_dim and attn.bias_k is None
            ok = ok and not (attn.add_zero_attn or attn.dropout)
        else:  # clip_model's
            ok = all(hasattr(attn, n) for n in ("heads", "in_proj_weight", "out_proj"))
        ok = ok and attn.in_proj_bias is not None
        linear_mlp = all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("c_fc", "c_proj"))
        if not (ok and linear_mlp):
            raise ValueError(f"a {type(block).__name__} with attn {type(attn).__name__}: expected attn a "
                             "clip_model.Attention or an nn.MultiheadAttention (fused in_proj, "
                             "in_proj_bias; no dropout, bias_k, add_zero_attn) and linear "
                             "mlp.c_fc, mlp.c_proj")
    return blocks


def apply_lora(model, encoder="both", r=4, alpha=1.0, targets=TARGETS, dropout=0.0, mlp=False,
               init="zero"):
    """Add LoRA to every block of the chosen tower(s), freeze all else but adapters (in place;
    returns model). Unmerged, each update costs one thin extra path; merge_lora removes it.

    model: a CLIP in OpenAI's layout (visual.transformer.resblocks, transformer.resblocks);
        anything else is refused unchanged.
    encoder: "image", "text" or "both"; r, alpha: rank and scale alpha/r of each update B A.
    targets: any of q, k, v (one A shared, as released) and out; mlp: c_fc and c_proj too.
    dropout: on each low-rank path's input, in training.
    init: "zero" (B = 0) or "released" (q/k/v both xavier).
    """
    if isinstance(targets, str) or not set(targets) <= set(TARGETS) or not (targets or mlp):
        raise ValueError(f"targets={targets!r} with mlp={mlp}; expected a tuple of names from "
                         f"{TARGETS}, e.g. ('q', 'v'), empty only with mlp=True")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r}; expected an integer rank >= 1")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r}; expected a number > 0 (updates are scaled by alpha/r)")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r}; expected a probability in [0, 1)")
    if init not in INITS:
        raise ValueError(f"init={init!r}; expected one of {INITS}")
    if lora_modules(model):
        raise ValueError("model already has LoRA modules; apply_lora once per model")
    blocks = tower_blocks(model, encoder)  # checked before anything changes
    for name, p in model.named_parameters():  # CLIP frozen, logit_scale too; adapter.py's kept
        p.requires_grad_(p.requires_grad and ".adapter." in name)
    slots = [i for i, name in enumerate(("q", "k", "v")) if name in targets]
    for block in blocks:
        if slots or "out" in targets:
            block.attn = LoRAAttention(block.attn, slots, r, alpha, dropout, init)
        if "out" in targets:
            block.attn.out_proj = LoRALinear(block.attn.out_proj, r, alpha, dropout)
        if mlp:
            block.mlp.c_fc = LoRALinear(block.mlp.c_fc, r, alpha, dropout)
            block.mlp.c_proj = LoRALinear(block.mlp.c_proj, r, alpha, dropout)
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every update into its frozen weight (its dtype), W <- W + (alpha/r) B A, for inference:
    outputs unchanged, without the thin extra path each unmerged update costs."""
    # Explicit, never on .eval() as in loralib: there a checkpoint saved in eval mode holds merged
    # weights, and loading it under LoRA counts the update twice.
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA modules; nothing to merge (call apply_lora first)")
    for m in modules:
        if not m.merged:
            if isinstance(m, LoRAAttention):
                m.in_proj_weight += (m.placed_B() @ m.lora_A * m.scaling).to(m.in_proj_weight.dtype)
            else:
                m.weight += (m.lora_B @ m.lora_A * m.scaling).to(m.weight.dtype)
            m.merged = True
    return model


def lora_state_dict(model):
    """Only the LoRA tensors, under their model.state_dict() names (sharing storage)."""
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}


def load_lora_state_dict(model, state_dict):
    """Restore tensors saved by lora_state_dict; refuse missing, unexpected or mis-shaped keys
    before copying any."""
    if any(m.merged for m in lora_modules(model)):
        raise ValueError("model's LoRA updates are merged into its weights; load into an unmerged one")
    own = lora_state_dict(model)
    for name in sorted(own.keys() | state_dict.keys()):
        got = tuple(getattr(state_dict[name], "shape", ())) if name in state_dict else "absent"
        want = tuple(own[name].shape) if name in own else "absent"
        if got != want:
            raise ValueError(f"LoRA state dict: {name!r} saved: {got}, in the model: {want} "
                             "(saved with other encoder, targets, mlp or r?)")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            own[name].copy_(tensor)


def count_trainable(model) -> int:
    """Number of parameters an optimizer would update (requires_grad=True)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
