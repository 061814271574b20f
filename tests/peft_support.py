"""Helpers shared by tests/test_lora.py and tests/test_adapter.py: features, a CLIP loss, a few AdamW steps; the
other CLIPs in OpenAI's layout: open_clip's, and a replica of OpenAI's `clip` package."""

from collections import OrderedDict

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_model import build_model


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
    images, tokens, labels = batch  # encode_*, not forward: open_clip's CLIP returns features, not logits
    image_features = F.normalize(model.encode_image(images), dim=-1)
    text_features = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * image_features @ text_features.t()
    return F.cross_entropy(logits.float(), labels)  # in fp32 on an fp16/bf16 model


def train(model, batch, steps):
    """`steps` AdamW steps on clip_loss; returns the model."""
    # Every parameter goes to AdamW with weight decay: a frozen one would move if it ever got a gradient.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        clip_loss(model, batch).backward()
        optimizer.step()
    return model


# ---- the other CLIPs in OpenAI's layout: open_clip's, and a replica of OpenAI's `clip` package (not installed) ----

OPEN_CLIP_CONFIG = {  # tiny, with several heads of another width than 64 in each tower
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
OPEN_CLIP_SETTINGS = dict(act="gelu", vision_heads=4, transformer_heads=2)  # what build_model cannot read off it


def open_clip_model(seed=0):
    """A random open_clip CLIP (GELU; nn.MultiheadAttention, batch-first) of OPEN_CLIP_CONFIG, in eval mode."""
    import open_clip
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**OPEN_CLIP_CONFIG).eval()


class LayerNorm(nn.LayerNorm):
    """OpenAI's: computed in fp32, returned in the input's dtype (convert_weights leaves its weights fp32)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class OpenAIBlock(nn.Module):
    """OpenAI's clip/model.py ResidualAttentionBlock: sequence-first (L, N, D), nn.MultiheadAttention, mask held."""

    def __init__(self, d_model, n_head, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x):
        self.attn_mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0]

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenAITransformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[OpenAIBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class OpenAIVisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = OpenAITransformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (N, grid**2, width)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAICLIP(nn.Module):
    """OpenAI's clip/model.py CLIP (ViT) at the sizes of a clip_model.CLIPConfig (its default head counts)."""

    def __init__(self, c):
        super().__init__()
        self.visual = OpenAIVisionTransformer(c.image_size, c.vision_patch_size, c.vision_width, c.vision_layers,
                                              c.vision_width // 64, c.embed_dim)
        mask = torch.empty(c.context_length, c.context_length).fill_(float("-inf")).triu_(1)
        self.transformer = OpenAITransformer(c.transformer_width, c.transformer_layers, c.transformer_width // 64, mask)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.ln_final = LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        return self.visual(image.type(self.dtype))

    def encode_text(self, text):
        x = self.token_embedding(text).type(self.dtype) + self.positional_embedding.type(self.dtype)
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def openai_clip_model(plain):
    """OpenAI's `clip` model (the replica above) holding the weights of clip_model's CLIP `plain`."""
    model = OpenAICLIP(plain.config)
    model.load_state_dict(plain.state_dict(), strict=True)
    return model.eval()


def convert_weights(model, dtype=torch.float16):
    """OpenAI's clip.model.convert_weights (what clip.load does on CUDA): linear, conv and attention weights and
    the projections in `dtype`, LayerNorm and embeddings left fp32."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.to(dtype)
        if isinstance(module, nn.MultiheadAttention):
            for tensor in (module.in_proj_weight, module.in_proj_bias):
                tensor.data = tensor.data.to(dtype)
        for name in ("text_projection", "proj"):
            if hasattr(module, name):
                getattr(module, name).data = getattr(module, name).to(dtype)
    return model


def low_precision_model(plain, kind, dtype):
    """A CLIP of `kind` in `dtype`, in eval mode: "openai" as convert_weights leaves it, "open_clip" as its
    precision="fp16"/"bf16" leaves it (LayerNorm fp32 in both), "clip_model" all in `dtype` (clip_model's `plain`)."""
    if kind == "openai":
        return convert_weights(openai_clip_model(plain), dtype)
    if kind == "open_clip":
        import open_clip
        torch.manual_seed(0)
        model = open_clip.model.CLIP(**OPEN_CLIP_CONFIG, cast_dtype=dtype).eval()
        open_clip.model.convert_weights_to_lp(model, dtype)
        return model
    return copy.deepcopy(plain).to(dtype)


def frozen_state_dict(model):
    """The model's OpenAI-layout weights, without the PEFT tensors."""
    return {k: v for k, v in model.state_dict().items() if "lora_" not in k and ".adapter." not in k}


def reference_and_ours(plain, kind):
    """(a CLIP of `kind`, "open_clip" or "openai", clip_model's CLIP built from its state dict): the same function."""
    if kind == "open_clip":
        reference, settings = open_clip_model(), OPEN_CLIP_SETTINGS
    else:
        reference, settings = openai_clip_model(plain), {}  # QuickGELU, as OpenAI's
    return reference, build_model(frozen_state_dict(reference), **settings)
