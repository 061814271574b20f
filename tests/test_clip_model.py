"""clip_model.py against open_clip (the reference oracle) on the same random weights in OpenAI's layout."""

import argparse
import json

import numpy as np
import open_clip
import pytest
import torch

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
    images = torch.randn(2, 3, config.image_size, config.image_size)
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
    config = CLIPConfig(embed_dim=48, image_size=48, vision_layers=3, vision_width=128, vision_patch_size=16,
                        context_length=20, transformer_width=128, transformer_heads=2, transformer_layers=1)
    model = clip_model.build_model(openai_state_dict(config))
    assert model.config == config
    assert model.visual.image_size == 48
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
    """A TorchScript archive whose state_dict() is `state_dict` and three sizes, as OpenAI ships CLIP."""
    root = Holder()
    sizes = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}
    for key, value in {**state_dict, **sizes}.items():
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


def test_heads_that_do_not_split_the_width_raise_a_clear_error():
    with pytest.raises(CheckpointError, match="width 64 does not split into 3 attention heads"):
        clip_model.build_model(openai_state_dict(TINY), vision_heads=3)


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
    assert not (tmp_path / "cache2").exists()  # neither the file nor the folder made for it


def test_a_failed_download_leaves_no_file_and_no_new_folder(tmp_path):
    missing = (tmp_path / "nowhere" / "ViT-B-16.pt").as_uri()  # fails offline, as a dropped network does
    with pytest.raises(clip_model.DownloadError, match="ViT-B-16.pt"):
        clip_model.download(missing, str(tmp_path / "home" / ".cache" / "clip"), "0" * 64)
    assert not (tmp_path / "home").exists()


def test_a_pickle_that_is_no_checkpoint_is_refused_without_advising_weights_only_false(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(argparse.Namespace(lr=0.1), path)  # loading it would run code from the file
    with pytest.raises(CheckpointError, match="not a TorchScript archive nor a torch state dict") as error:
        clip_model.load(str(path))
    assert "weights_only" not in str(error.value) and len(str(error.value).splitlines()) == 1


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


def test_class_text_features_are_unit_norm():
    model = clip_model.build_model(openai_state_dict(TINY))
    with torch.no_grad():
        g = clip_model.class_text_features(model, ["cat", "aquarium fish"])
    assert g.shape == (2, 32)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(2))


# -----------------------------------------------------------------------------
# open_clip checkpoints: the activation, head counts and mean/std from open_clip_config.json

SMALL_VIT = {  # head width 80 (4 heads, not width // 64 = 5), MLP ratio 2.5, text head width 24: as ViT-H/bigG do
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 320, "head_width": 80, "mlp_ratio": 2.5, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 2},
}


def open_clip_reference(model_cfg):
    """A randomly initialised open_clip CLIP of this model config (GELU unless it says quick_gelu)."""
    torch.manual_seed(0)
    return open_clip.model.CLIP(**model_cfg).eval()


def save_open_clip(model, folder, model_cfg=None, wrap=False, preprocess=None):
    """The model's weights as open_clip users save them, with the hubs' open_clip_config.json beside them."""
    folder.mkdir(exist_ok=True)
    sd = model.state_dict()
    if wrap:  # a training checkpoint: epoch_N.pt of open_clip's trainer, keys prefixed by DistributedDataParallel
        sd = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(sd, folder / "weights.pt")
    if model_cfg is not None:
        config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess or {}}
        (folder / "open_clip_config.json").write_text(json.dumps(config))
    return str(folder / "weights.pt")


def assert_features_equal(ours, ref, image_size):
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    tokens = clip_model.tokenize(TEXTS[:3])
    with torch.no_grad():
        assert_close(ours.encode_image(images), ref.encode_image(images))
        assert_close(ours.encode_text(tokens), ref.encode_text(tokens))


def test_open_clip_gelu_vit_b16_loads_with_act_gelu(tmp_path, capsys):
    ref = open_clip.create_model("ViT-B-16", pretrained=None).eval()  # GELU, as LAION's and DataComp's
    path = save_open_clip(ref, tmp_path)
    ours = clip_model.load(path, act="gelu")
    assert ours.config.act == "gelu" and isinstance(ours.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert_features_equal(ours, ref, 224)
    assert capsys.readouterr().err == ""  # an explicit activation needs no note


def test_without_a_config_quickgelu_is_assumed_and_said(tmp_path, capsys):
    model_cfg = {**SMALL_VIT, "vision_cfg": {**SMALL_VIT["vision_cfg"], "head_width": 64, "mlp_ratio": 4.0},
                 "text_cfg": {**SMALL_VIT["text_cfg"], "width": 128, "heads": 2}}  # OpenAI's head width 64
    ref = open_clip_reference(model_cfg)
    path = save_open_clip(ref, tmp_path)
    assumed = clip_model.load(path)
    err = capsys.readouterr().err
    assert assumed.config.act == "quickgelu"
    assert "QuickGELU" in err and "--act gelu" in err and len(err.strip().splitlines()) == 1
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the wrong activation is off by far more than float rounding
        assert not torch.allclose(assumed.encode_image(images), ref.encode_image(images), rtol=1e-3, atol=0)
    assert_features_equal(clip_model.load(path, act="gelu"), ref, 32)


def test_open_clip_config_beside_the_weights_decides_act_heads_and_mean_std(tmp_path, capsys):
    ref = open_clip_reference(SMALL_VIT)
    path = save_open_clip(ref, tmp_path, SMALL_VIT, preprocess={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    ours = clip_model.load(path)
    c = ours.config
    assert (c.act, c.vision_heads, c.transformer_heads, c.vision_mlp_width) == ("gelu", 4, 4, 800)
    assert c.image_mean == (0.5, 0.5, 0.5) and c.image_std == (0.25, 0.25, 0.25)
    assert_features_equal(ours, ref, 32)
    assert capsys.readouterr().err == ""


def test_open_clip_quickgelu_config_loads_quickgelu(tmp_path):
    model_cfg = {**SMALL_VIT, "quick_gelu": True}  # as open_clip's ViT-B-16-quickgelu (MetaCLIP, DFN)
    ref = open_clip_reference(model_cfg)
    ours = clip_model.load(save_open_clip(ref, tmp_path, model_cfg))
    assert ours.config.act == "quickgelu" and ours.config.image_mean == clip_model.CLIP_MEAN
    assert_features_equal(ours, ref, 32)


def test_open_clip_training_checkpoint_loads_with_its_prefix_stripped(tmp_path):
    ref = open_clip_reference(SMALL_VIT)
    ours = clip_model.load(save_open_clip(ref, tmp_path, SMALL_VIT, wrap=True))
    assert_features_equal(ours, ref, 32)


@pytest.mark.parametrize("tower, key, value", [("text_cfg", "hf_model_name", "xlm-roberta-base"),
                                                ("text_cfg", "pool_type", "last"),
                                                ("vision_cfg", "final_ln_after_pool", True),
                                                ("vision_cfg", "timm_model_name", "vit_base_patch16_224")])
def test_open_clip_options_we_do_not_implement_are_refused(tmp_path, tower, key, value):
    ref = open_clip_reference(SMALL_VIT)
    model_cfg = json.loads(json.dumps(SMALL_VIT))
    model_cfg[tower][key] = value
    with pytest.raises(CheckpointError, match=f"{tower}.{key}"):
        clip_model.load(save_open_clip(ref, tmp_path, model_cfg))


def test_a_config_of_another_model_is_refused(tmp_path):
    ref = open_clip_reference(SMALL_VIT)
    other = {**SMALL_VIT, "vision_cfg": {**SMALL_VIT["vision_cfg"], "width": 640}}
    with pytest.raises(CheckpointError, match="vision_width 640 in the config, 320 in the weights"):
        clip_model.load(save_open_clip(ref, tmp_path, other))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, but OpenAI ships it
def test_openai_archives_load_as_quickgelu_without_a_note(tmp_path, capsys):
    torchscript_archive(openai_state_dict(TINY), tmp_path / "jit.pt")
    model = clip_model.load(str(tmp_path / "jit.pt"))
    assert model.config.act == "quickgelu" and capsys.readouterr().err == ""


def test_unknown_activation_is_refused(tmp_path):
    torch.save(openai_state_dict(TINY), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="relu"):
        clip_model.load(str(tmp_path / "plain.pt"), act="relu")
