"""
The paper's backbone: OpenAI's CLIP (Radford et al., 2021), a ViT image tower and a text tower
whose L2-normalized features f_i and g_c give the loss its logits s * <f_i, g_c>; g_c is the text
feature of the prompt "a bad photo of a {class}." (`class_text_features`). Names are OpenAI's
state-dict keys, so its weights load strictly (`load`, after the marked line).
"""

import contextlib
import gzip
import hashlib
import html
import importlib.util
import json
import os
import shutil
import sys
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache

import ftfy
import regex as re
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ---- building blocks ----


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as OpenAI's, for fp16/bf16 safety)."""

    def forward(self, x):
        weight = self.weight.float()
        bias = self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# OpenAI's CLIP; most open_clip checkpoints (LAION, DataComp, MetaCLIP) use GELU
ACTIVATIONS = ("quickgelu", "gelu")


class Attention(nn.Module):
    """Batch-first multi-head self-attention with nn.MultiheadAttention's parameter names."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # q, k, v stacked
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, attn_mask=None):
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN1(x)), then x + MLP(LN2(x))."""

    def __init__(self, width, heads, mlp_width, act):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", QuickGELU() if act == "quickgelu" else nn.GELU())  # OpenAI's name for either
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks (shared by both towers)."""

    def __init__(self, width, layers, heads, mlp_width, act):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_width, act) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


# ---- the two towers and CLIP ----

# The image normalization OpenAI's CLIP was trained with (open_clip checkpoints may have their own).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    embed_dim: int = 512           # joint image-text embedding size
    image_size: int = 224          # input image side in pixels
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 16
    context_length: int = 77       # text tokens, start and end-of-text included
    vocab_size: int = 49408        # BPE vocabulary and the two special tokens (see `get_tokenizer`)
    transformer_width: int = 512   # text tower width
    transformer_heads: int = None  # None: transformer_width // 64 (open_clip's ViT-H/g/bigG differ)
    transformer_layers: int = 12
    vision_heads: int = None       # None: vision_width // 64
    vision_mlp_width: int = None   # None: 4 * vision_width (open_clip's ViT-g/bigG: other ratios)
    transformer_mlp_width: int = None  # None: 4 * transformer_width
    act: str = "quickgelu"         # MLP activation, one of ACTIVATIONS (the weights do not tell)
    image_mean: tuple = CLIP_MEAN  # per-channel normalization the image tower was trained with
    image_std: tuple = CLIP_STD

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act={self.act!r}; expected one of {ACTIVATIONS}")
        self.vision_heads = self.vision_heads or self.vision_width // 64
        self.transformer_heads = self.transformer_heads or self.transformer_width // 64
        self.vision_mlp_width = self.vision_mlp_width or 4 * self.vision_width
        self.transformer_mlp_width = self.transformer_mlp_width or 4 * self.transformer_width
        for width, heads in [(self.vision_width, self.vision_heads),
                             (self.transformer_width, self.transformer_heads)]:
            if heads < 1 or width % heads:
                raise ValueError(f"width {width} does not split into {heads} attention heads")


# The same layout at toy size, for tests and `--smoke`.
TINY_CONFIG = CLIPConfig(embed_dim=32, image_size=32, vision_layers=2, vision_width=64,
                         vision_patch_size=8, transformer_width=64, transformer_heads=1,
                         transformer_layers=2)


class VisionTransformer(nn.Module):
    """ViT image tower: patchify, prepend the class token, transformer, project the class token."""

    def __init__(self, image_size, patch_size, width, layers, heads, mlp_width, act, output_dim):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        n_patches = (image_size // patch_size) ** 2
        self.positional_embedding = nn.Parameter(scale * torch.randn(n_patches + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_width, act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, 1+grid*grid, width)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, output_dim)


class CLIP(nn.Module):
    """Image tower `.visual` and the text tower (top-level attributes, as in OpenAI's layout)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = c = config
        self.visual = VisionTransformer(c.image_size, c.vision_patch_size, c.vision_width,
                                        c.vision_layers, c.vision_heads, c.vision_mlp_width, c.act,
                                        c.embed_dim)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.transformer = Transformer(c.transformer_width, c.transformer_layers,
                                       c.transformer_heads, c.transformer_mlp_width, c.act)
        self.ln_final = LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # log(100)
        # True = may attend (SDPA's boolean convention): token t sees tokens 0..t.
        causal = torch.ones(c.context_length, c.context_length, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)
        # OpenAI's initialization, so that random models (tests, --smoke) are well-scaled
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower, width in [(self.transformer, c.transformer_width),
                             (self.visual.transformer, c.vision_width)]:
            proj_std = (width ** -0.5) * ((2 * len(tower.resblocks)) ** -0.5)
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=c.transformer_width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, images):
        """(B, 3, H, W) normalized images -> (B, embed_dim) unnormalized image features."""
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens):
        """(B, T) token ids, T <= context_length -> (B, embed_dim) unnormalized features at the
        end-of-text token."""
        T = tokens.shape[1]
        x = self.token_embedding(tokens)  # (B, T, width)
        x = x + self.positional_embedding[:T].to(self.dtype)
        x = self.ln_final(self.transformer(x, self.causal_mask[:T, :T]))
        eot = tokens.argmax(dim=-1)  # end-of-text has the largest id
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, eot] @ self.text_projection  # (B, embed_dim)

    def forward(self, images, tokens):
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or not an OpenAI-layout ViT CLIP."""


def build_model(state_dict, act="quickgelu", **settings) -> CLIP:
    """A CLIP sized by OpenAI-layout tensors, which it loads strictly (fp32); what they cannot tell
    comes from `act` and `settings` (CLIPConfig fields)."""
    # OpenAI's TorchScript archives also hold these three sizes as tensors
    sizes_as_tensors = ("input_resolution", "context_length", "vocab_size")
    sd = {k: v for k, v in state_dict.items() if k not in sizes_as_tensors}
    if any(k.startswith("visual.layer1.") for k in sd):
        raise CheckpointError("this is a ResNet CLIP checkpoint; only ViT CLIP models are supported")

    def shape(key):
        if key not in sd:
            raise CheckpointError(f"not an OpenAI-layout ViT CLIP state dict (no {key!r} key)")
        return sd[key].shape

    def n_blocks(tower):
        return sum(k.startswith(tower + ".") and k.endswith(".ln_1.weight") for k in sd)

    patch = shape("visual.conv1.weight")[-1]
    grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)  # patches per image side
    sizes = dict(
        embed_dim=shape("text_projection")[1],
        image_size=patch * grid,
        vision_patch_size=patch,
        vision_width=shape("visual.conv1.weight")[0],
        vision_layers=n_blocks("visual"),
        vision_mlp_width=shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
        context_length=shape("positional_embedding")[0],
        vocab_size=shape("token_embedding.weight")[0],
        transformer_width=shape("ln_final.weight")[0],
        transformer_layers=n_blocks("transformer"),
        transformer_mlp_width=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
    )
    try:
        model = CLIP(CLIPConfig(**{**sizes, "act": act, **settings}))
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:  # a bad setting, a missing key, a bad shape
        raise CheckpointError(f"cannot build a ViT CLIP from this state dict and these settings "
                              f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    return model.eval()


# ---- tokenizer: byte-level BPE exactly as OpenAI's clip.tokenize ----

# A vocabulary is 256 byte tokens, the same 256 ending a word ("</w>"), the first n merges of the
# BPE file, and <|startoftext|>, <|endoftext|>: OpenAI's has 48,894 merges (49,408 tokens). With no
# merges (514 tokens) every byte is its own token and no vocabulary file is needed (--smoke, offline).
OPENAI_VOCAB_SIZE = 49408
BYTE_VOCAB_SIZE = 2 * 256 + 2


def bytes_to_unicode():
    """Every byte as a printable character, so BPE works on strings without spaces and controls."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # spaces, controls: to 256, 257, ...
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clean_text(text):
    """OpenAI's cleaning: fix mojibake, unescape HTML (twice), collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    """Byte-level BPE with the given merges (OpenAI's 48,894, or none)."""

    pattern = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                         r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", re.IGNORECASE)

    def __init__(self, merges):
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.sot = self.encoder["<|startoftext|>"]
        self.eot = self.encoder["<|endoftext|>"]

    def bpe(self, token):
        """Greedily merge the lowest-ranked adjacent pair until no known merge is left."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged = []  # every occurrence of `best`, left to right
            for symbol in word:
                if merged and (merged[-1], symbol) == best:
                    merged[-1] += symbol
                else:
                    merged.append(symbol)
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text):
        ids = []
        for token in re.findall(self.pattern, clean_text(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids


@lru_cache()
def get_tokenizer(vocab_size=OPENAI_VOCAB_SIZE, bpe_path=None):
    """The tokenizer of a text tower with `vocab_size` token embeddings (OpenAI's, or 514: bytes)."""
    n_merges = vocab_size - BYTE_VOCAB_SIZE
    if not 0 <= n_merges <= OPENAI_VOCAB_SIZE - BYTE_VOCAB_SIZE:
        raise CheckpointError(f"no tokenizer for a vocabulary of {vocab_size} tokens: expected "
                              f"{BYTE_VOCAB_SIZE} (bytes only) to {OPENAI_VOCAB_SIZE} (OpenAI's BPE)")
    if not n_merges:
        return Tokenizer([])
    with gzip.open(bpe_vocab_path(bpe_path), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:n_merges + 1]  # after the header line
    return Tokenizer([tuple(m.split()) for m in merges])


def tokenize(texts, context_length=77, truncate=False, vocab_size=OPENAI_VOCAB_SIZE):
    """Strings -> (N, context_length) ids: <sot> text <eot>, zero padded (OpenAI's clip.tokenize)."""
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = get_tokenizer(vocab_size)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tokenizer.sot] + tokenizer.encode(text) + [tokenizer.eot]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"input {text!r} is {len(ids)} tokens, "
                                 f"longer than context length {context_length}")
            ids = ids[:context_length - 1] + [tokenizer.eot]
        result[i, :len(ids)] = torch.tensor(ids)
    return result


# ---- prompts: the text features g_c of the classes ----

PROMPT = "a bad photo of a {}."


def trim_padding(tokens):
    """Drop the padding after the last end-of-text token, which the causal mask keeps from it:
    prompts run on ~10 positions instead of 77, with the same features."""
    return tokens[:, :int(tokens.argmax(dim=-1).max()) + 1]


def prompt_tokens(model, class_names, template=PROMPT):
    """(C, T) ids of `template.format(name)` per class, padding trimmed, on the model's device."""
    tokens = tokenize([template.format(name) for name in class_names], model.config.context_length,
                      vocab_size=model.config.vocab_size)
    return trim_padding(tokens).to(model.positional_embedding.device)


def class_text_features(model, class_names, template=PROMPT):
    """L2-normalized text features g_c of `template.format(name)` for each class."""
    return F.normalize(model.encode_text(prompt_tokens(model, class_names, template)), dim=-1)


# ---- machinery: checkpoints, downloads, the device (not the method) ----

_BASE = "https://openaipublic.azureedge.net/clip/models"
_MODELS = {  # the folder of each URL is the file's SHA256, verified after download
    "ViT-B/32": f"{_BASE}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_BASE}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_BASE}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_BASE}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/"
                      "ViT-L-14-336px.pt",
}
CACHE_DIR = os.path.expanduser("~/.cache/clip")  # OpenAI's weights and the BPE vocabulary


class DownloadError(OSError):
    def __init__(self, what, url, error, put_at):
        reason = getattr(error, "reason", error)  # a URLError wraps the OS error that says why
        super().__init__(f"could not download {what} from {url} ({reason}); without network, "
                         f"fetch it elsewhere and put it at {put_at}")


def available_models():
    """Names that `load` downloads from OpenAI."""
    return list(_MODELS)


def sha256sum(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # in 1 MB chunks: ViT-L/14@336px is 900 MB
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def undo_new_folders(folder):
    """On an exception inside, remove `folder` and its parents where they are new and still empty."""
    new = []  # deepest first
    while folder and not os.path.exists(folder):
        new.append(folder)
        folder = os.path.dirname(folder)
    try:
        yield
    except BaseException:
        for path in new:
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        raise


def download(url, root, sha256, what=None):
    """The path of `url`'s file in `root`, downloaded unless a verified copy is there (a failed
    download leaves no file, no new folder)."""
    path = os.path.join(root, os.path.basename(url))
    if os.path.isfile(path) and sha256sum(path) == sha256:
        return path
    tmp = path + ".part"  # only a verified file gets the name the next run trusts
    with undo_new_folders(root):
        os.makedirs(root, exist_ok=True)
        try:
            with urllib.request.urlopen(url) as source, open(tmp, "wb") as out:
                size = getattr(source, "length", None)
                with tqdm.wrapattr(out, "write", total=size, desc=os.path.basename(url)) as bar:
                    shutil.copyfileobj(source, bar)
            if sha256sum(tmp) != sha256:
                raise CheckpointError(f"{url}: downloaded file does not match its SHA256 {sha256}")
        except BaseException as e:  # Ctrl-C too
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, OSError):  # no network, DNS, HTTP error (URLError), broken connection
                raise DownloadError(what or os.path.basename(url), url, e, path) from None
            raise
    os.replace(tmp, path)
    return path


def checkpoint_path(name_or_path, download_root=None):
    """The local file of an OpenAI model name (downloaded once) or of a checkpoint path."""
    if name_or_path in _MODELS:
        url = _MODELS[name_or_path]
        sha256 = url.split("/")[-2]
        return download(url, download_root or CACHE_DIR, sha256, f"the CLIP {name_or_path} weights")
    if os.path.isfile(name_or_path):
        return name_or_path
    raise CheckpointError(f"{name_or_path}: no such checkpoint file, "
                          f"nor a model name in {available_models()}")


def is_torchscript(path):
    """TorchScript archives (how OpenAI ships CLIP): zip files, code beside the pickled tensors."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_state_dict(path):
    """Tensors of a TorchScript archive, a state dict, or open_clip's epoch_N.pt."""
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated: OpenAI's
                return torch.jit.load(path, map_location="cpu").state_dict()
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not torch's message: it advises unpickling code, unsafe for a download
        raise CheckpointError(f"{path}: not a TorchScript archive nor a torch state dict "
                              f"of tensors ({type(e).__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # DistributedDataParallel's prefix
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


OPEN_CLIP_CONFIG = "open_clip_config.json"  # beside open_clip's weights, as on its model hubs
# open_clip options that change the forward pass without changing the state-dict keys, or that we do
# not implement: a config that sets one to another value than open_clip's default is refused, never
# loaded as a different model.
_OPEN_CLIP_OFF = (  # default: unset
    "timm_model_name attentional_pool no_ln_pre hf_model_name hf_tokenizer_name tokenizer_kwargs "
    "no_causal_mask final_ln_after_pool embed_cls proj_bias ls_init_value act_kwargs norm_kwargs "
    "qk_norm scaled_cosine_attn scale_heads scale_attn_inner scale_attn scale_fc").split()
_OPEN_CLIP_DEFAULTS = {
    "vision_cfg": {"pool_type": "tok", "pos_embed_type": "learnable", "block_type": "default"},
    "text_cfg": {"pool_type": "argmax", "proj_type": "linear", "block_type": "default"},
}


def open_clip_settings(path):
    """build_model settings from an open_clip_config.json (act: quick_gelu, false when absent; head
    counts; mean/std), and its sizes, to compare with the weights'."""
    try:
        with open(path) as f:
            cfg = json.load(f)
        model_cfg = cfg.get("model_cfg", cfg)  # the hubs' layout, or a bare config as in open_clip
        vision = model_cfg["vision_cfg"]
        text = model_cfg["text_cfg"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable open_clip config ({type(e).__name__}: {e})") from None
    if model_cfg.get("custom_text") or "multimodal_cfg" in model_cfg or "init_logit_bias" in model_cfg:
        raise CheckpointError(f"{path}: a custom-text, CoCa or SigLIP model; only CLIP ViTs are supported")
    for tower, options in (("vision_cfg", vision), ("text_cfg", text)):
        expected = dict.fromkeys(_OPEN_CLIP_OFF)
        expected.update(_OPEN_CLIP_DEFAULTS[tower])
        for key, default in expected.items():
            if (options.get(key) or default) != default:  # absent, None, False, {}: open_clip's default
                raise CheckpointError(f"{path}: {tower}.{key} = {options[key]!r} is not supported: this "
                                      "model would not compute what open_clip computes")
    preprocess = cfg.get("preprocess_cfg", {})
    settings = {"act": "quickgelu" if model_cfg.get("quick_gelu", False) else "gelu",
                "vision_heads": vision.get("width", 768) // vision.get("head_width", 64),
                "transformer_heads": text.get("heads", 8),
                "image_mean": tuple(preprocess.get("mean", CLIP_MEAN)),
                "image_std": tuple(preprocess.get("std", CLIP_STD))}
    sizes = {"embed_dim": model_cfg.get("embed_dim"), "vision_width": vision.get("width"),
             "vision_layers": vision.get("layers"), "vision_patch_size": vision.get("patch_size"),
             "transformer_width": text.get("width"), "transformer_layers": text.get("layers")}
    resize = (preprocess.get("resize_mode", "shortest"), preprocess.get("interpolation", "bicubic"))
    if resize != ("shortest", "bicubic"):
        print(f"note: {path} asks for resize_mode {resize[0]!r}, interpolation {resize[1]!r}; test "
              "images get OpenAI's preprocessing here (shorter side, bicubic, centre crop) with its "
              "mean/std", file=sys.stderr)
    return settings, {k: v for k, v in sizes.items() if v is not None}


def resolve_device(name):
    """auto -> cuda when available, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU: use --device cpu or auto")
    return name


def autocast(device, precision):
    """A context-manager factory: bf16 autocast on CUDA for "auto", else fp32."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def load(name_or_path, device="cpu", download_root=None, act=None) -> CLIP:
    """A ViT CLIP by OpenAI name or checkpoint path; fp32, eval mode. `act` None: an
    open_clip_config.json beside the checkpoint decides it, else QuickGELU (said unless OpenAI's)."""
    path = checkpoint_path(name_or_path, download_root)
    state_dict = read_state_dict(path)
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), OPEN_CLIP_CONFIG)
    settings = {}
    sizes = {}
    if os.path.isfile(config_path):
        settings, sizes = open_clip_settings(config_path)
    if act is not None:
        settings["act"] = act
    elif not settings and name_or_path not in _MODELS and not is_torchscript(path):
        print(f"note: {path}: no {OPEN_CLIP_CONFIG} beside it, so OpenAI's QuickGELU is assumed; "
              "for a GELU model (most open_clip checkpoints) pass act='gelu' (--act gelu)", file=sys.stderr)
    try:
        model = build_model(state_dict, **settings)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    wrong = [f"{k} {v} in the config, {getattr(model.config, k)} in the weights"
             for k, v in sizes.items() if getattr(model.config, k) != v]
    if wrong:
        raise CheckpointError(f"{config_path} describes another model than {path}: {', '.join(wrong)}")
    return model.to(device)


# the BPE vocabulary file of `get_tokenizer`
_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_BPE_URL = f"https://github.com/openai/CLIP/raw/main/clip/{_BPE_NAME}"
_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def bpe_vocab_path(path=None):
    """The BPE file: argument, $CLIP_BPE_PATH, ~/.cache/clip, open_clip or clip, download."""
    path = path or os.environ.get("CLIP_BPE_PATH")
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: BPE vocabulary file not found")
    folders = [CACHE_DIR]
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)  # located, not imported
        if spec and spec.submodule_search_locations:
            folders.append(spec.submodule_search_locations[0])
    for candidate in [path] + [os.path.join(folder, _BPE_NAME) for folder in folders]:
        if candidate and os.path.isfile(candidate):
            return candidate
    return download(_BPE_URL, CACHE_DIR, _BPE_SHA256, what="the BPE vocabulary of CLIP's tokenizer")


def is_openai_vocabulary(path):
    """Whether a BPE vocabulary file is OpenAI's, byte for byte (its SHA256)."""
    return sha256sum(path) == _BPE_SHA256
