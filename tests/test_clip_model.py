"""clip_model.py against open_clip (the reference oracle) on the same random weights in OpenAI's layout."""

import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clip_model
from clip_model import CLIP, TINY_CONFIG as TINY, CheckpointError, CLIPConfig

VIT_B16 = CLIPConfig()  # the defaults are ViT-B/16

TEXTS = [
    "a bad photo of a cat.",
    "Café naïve — déjà vu 北京 😀 Ünïcödé",
    "Fish &amp; chips &lt;b&gt;&quot;bold&quot;&lt;/b&gt; &#39;quoted&#39;",
    "  odd\twhitespace\n\n and\u00a0nbsp  ",
    "it's we'll they'd I'M you're 3.14 1,000,000",
    "",
    "mojibake: cafÃ© â€œquotesâ€\x9d",
]


def openai_state_dict(config, seed=0):
    """Random CLIP weights in OpenAI's layout and dtype (fp16, as released)."""
    torch.manual_seed(seed)
    return {k: v.half() for k, v in CLIP(config).state_dict().items()}


def reference(state_dict):
    return open_clip.model.build_model_from_openai_state_dict(dict(state_dict)).float().eval()


def assert_close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("config", [TINY, VIT_B16], ids=["tiny", "ViT-B/16"])
def test_features_and_logits_equal_open_clip(config):
    sd = openai_state_dict(config)
    ours, ref = clip_model.build_model(sd), reference(sd)
    images = torch.randn(2, 3, config.image_resolution, config.image_resolution)
    tokens = clip_model.tokenize(TEXTS[:3])
    with torch.no_grad():
        assert_close(ours.encode_image(images), ref.encode_image(images))
        assert_close(ours.encode_text(tokens), ref.encode_text(tokens))
        logits_per_image, logits_per_text = ours(images, tokens)
        ref_image, ref_text, ref_scale = ref(images, tokens)
        assert_close(logits_per_image, ref_scale * ref_image @ ref_text.t())
        assert torch.equal(logits_per_text, logits_per_image.t())


def test_parameter_names_are_openai_state_dict_keys():
    sd = openai_state_dict(TINY)
    ref_keys = set(reference(sd).state_dict()) - {"attn_mask"}  # open_clip may keep its mask as a buffer
    assert set(CLIP(TINY).state_dict()) == ref_keys == set(sd)


def test_build_model_infers_sizes_from_tensors():
    config = CLIPConfig(embed_dim=48, image_resolution=48, vision_layers=3, vision_width=128, vision_patch_size=16,
                        context_length=20, transformer_width=128, transformer_heads=2, transformer_layers=1)
    model = clip_model.build_model(openai_state_dict(config))
    assert model.config == config
    assert model.visual.input_resolution == 48
    assert model.dtype == torch.float32 and not model.training


def test_causal_mask_is_a_non_persistent_buffer():
    model = CLIP(TINY)
    assert "causal_mask" in dict(model.named_buffers())
    assert "causal_mask" not in model.state_dict()


def test_trimmed_padding_gives_the_same_text_features():
    model = clip_model.build_model(openai_state_dict(TINY))
    tokens = clip_model.tokenize(["a cat", "a much longer caption about a dog"])
    trimmed = clip_model.trim_padding(tokens)
    assert trimmed.shape == (2, 9)  # <sot> + 7 tokens + <eot> of the longer caption
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(tokens))


class Holder(torch.nn.Module):
    def forward(self, x):
        return x


def torchscript_archive(state_dict, path):
    """A TorchScript archive whose state_dict() is `state_dict`, as OpenAI ships CLIP."""
    root = Holder()
    for key, value in state_dict.items():
        *parents, name = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, Holder())
            module = getattr(module, part)
        module.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    torch.jit.script(root).save(path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, but OpenAI ships it
def test_torchscript_archive_and_plain_state_dicts_load(tmp_path):
    sd = openai_state_dict(TINY)
    model = clip_model.build_model(sd)
    images = torch.randn(1, 3, 32, 32)
    torchscript_archive(sd, tmp_path / "jit.pt")
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pt")
    with torch.no_grad():
        expected = model.encode_image(images)
        for name in ("jit.pt", "plain.pt", "wrapped.pt"):
            loaded = clip_model.load(str(tmp_path / name))
            assert torch.equal(loaded.encode_image(images), expected), name


@pytest.mark.parametrize("case", ["missing", "random bytes", "resnet", "not clip", "not tensors"])
def test_bad_checkpoint_raises_a_clear_error(tmp_path, case):
    path = tmp_path / "ckpt.pt"
    if case == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "resnet":
        torch.save({"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "text_projection": torch.zeros(8, 8)},
                   path)
    elif case == "not clip":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    elif case == "not tensors":
        torch.save([1, 2, 3], path)
    message = {"missing": "no such checkpoint", "random bytes": "not a TorchScript archive",
               "resnet": "ResNet CLIP", "not clip": "not an OpenAI-layout ViT CLIP", "not tensors": "not a state dict"}
    with pytest.raises(CheckpointError, match=message[case]) as error:
        clip_model.load(str(path))
    assert str(path) in str(error.value)


def test_incomplete_state_dict_raises_a_clear_error():
    sd = openai_state_dict(TINY)
    del sd["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match="c_fc.bias"):
        clip_model.build_model(sd)


def test_unknown_model_name_raises():
    with pytest.raises(CheckpointError, match="ViT-B/16"):
        clip_model.load("ViT-H/99")


def test_download_verifies_sha256(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"not the real weights")
    good = clip_model.sha256sum(source)
    path = clip_model.download(source.as_uri(), str(tmp_path / "cache"), good)
    assert open(path, "rb").read() == b"not the real weights"
    with pytest.raises(CheckpointError, match="SHA256"):
        clip_model.download(source.as_uri(), str(tmp_path / "cache2"), "0" * 64)
    assert not os.listdir(tmp_path / "cache2")


def test_available_models_are_the_vit_checkpoints():
    assert clip_model.available_models() == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]


def test_tokenizer_equals_reference():
    assert torch.equal(clip_model.tokenize(TEXTS), open_clip.tokenize(TEXTS))


def test_too_long_text_raises_unless_truncated():
    text = "a very long caption " * 30
    with pytest.raises(ValueError, match="context length 77"):
        clip_model.tokenize(text)
    tokens = clip_model.tokenize(text, truncate=True)
    assert torch.equal(tokens, open_clip.tokenize([text]))
    assert tokens[0, -1] == 49407  # truncated text still ends with <|endoftext|>


def test_bpe_vocabulary_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_BPE_PATH", str(tmp_path / "missing.txt.gz"))
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        clip_model.bpe_vocab_path()


def test_image_transform_equals_reference():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    ref = open_clip.transform.image_transform(32, is_train=False)
    assert torch.equal(clip_model.image_transform(32)(image), ref(image))


def test_class_text_features_are_unit_norm():
    model = clip_model.build_model(openai_state_dict(TINY))
    with torch.no_grad():
        g = clip_model.class_text_features(model, ["cat", "aquarium fish"])
    assert g.shape == (2, 32)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(2))
