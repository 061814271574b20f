"""lora.py, property by property, on a tiny random CLIP (CPU, offline); the parameter count on ViT-B/16; the same
LoRA on open_clip's CLIP and OpenAI's `clip`; the models it refuses; lora.py and adapter.py copied alone."""

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import adapter
import lora
from clip_model import CLIP, TINY_CONFIG as TINY, CLIPConfig
from peft_support import clip_loss, features, low_precision_model, open_clip_model, reference_and_ours, train

REPOSITORY = Path(__file__).resolve().parent.parent


def tuned(plain, seed=0, **kwargs):
    torch.manual_seed(seed)  # A is drawn at random
    return lora.apply_lora(copy.deepcopy(plain), **kwargs)


@pytest.mark.parametrize("encoder", ["image", "text", "both"])
def test_at_init_the_tuned_model_is_zero_shot_clip(plain, batch, encoder):
    for ours, reference in zip(features(tuned(plain, encoder=encoder), batch), features(plain, batch)):
        assert torch.equal(ours, reference)


@pytest.mark.parametrize("encoder, image_changes, text_changes",
                         [("image", True, False), ("text", False, True), ("both", True, True)])
def test_a_step_changes_only_the_chosen_tower(plain, batch, encoder, image_changes, text_changes):
    image_before, text_before = features(plain, batch)
    image_after, text_after = features(train(tuned(plain, encoder=encoder), batch, steps=1), batch)
    assert (not torch.equal(image_after, image_before), not torch.equal(text_after, text_before)) == \
        (image_changes, text_changes)


@pytest.mark.parametrize("mlp", [False, True])
def test_only_lora_parameters_require_grad(plain, mlp):
    model = tuned(plain, mlp=mlp)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if "lora_" in name}
    # 2 towers x 2 blocks x (in_proj, out_proj, and c_fc, c_proj with mlp) x (A, B)
    assert "logit_scale" not in trainable and len(trainable) == 2 * 2 * (2 + 2 * mlp) * 2


def test_frozen_weights_receive_no_gradient(plain, batch):
    model = tuned(plain, mlp=True)
    clip_loss(model, batch).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, _ in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("mlp", [False, True])
def test_every_openai_key_keeps_its_tensor(plain, mlp):
    model = copy.deepcopy(plain)
    before = dict(model.named_parameters())
    lora.apply_lora(model, mlp=mlp)
    after = dict(model.named_parameters())
    assert all(after[name] is p for name, p in before.items())  # the very same Parameter objects
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in plain.state_dict().items())


@pytest.mark.parametrize("mlp", [False, True])
def test_added_keys_all_carry_lora(plain, mlp):
    added = set(tuned(plain, mlp=mlp).state_dict()) - set(plain.state_dict())
    assert added and all("lora_" in key for key in added)


def test_lora_updates_only_the_targeted_qkv_slices(plain):
    attn = tuned(plain, targets=("q", "v")).visual.transformer.resblocks[0].attn
    torch.nn.init.normal_(attn.lora_B)  # a non-zero update, B = [B_q; B_v]
    x = torch.randn(2, 5, TINY.vision_width)
    W_q, W_k, W_v = attn.in_proj_weight.detach().chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.detach().chunk(3)
    B_q, B_v = attn.lora_B.detach().chunk(2)
    A, s = attn.lora_A.detach(), attn.scaling
    expected = torch.cat([F.linear(x, W_q + s * B_q @ A, b_q), F.linear(x, W_k, b_k),
                          F.linear(x, W_v + s * B_v @ A, b_v)], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(attn.in_proj(x), expected, rtol=1e-5, atol=1e-5)


def test_the_text_tower_stays_causal(plain):
    model = tuned(plain, encoder="text")
    for module in lora.lora_modules(model):
        torch.nn.init.normal_(module.lora_B)  # make the updates non-zero
    x = torch.randn(1, 6, TINY.transformer_width)
    changed_last = x.clone()
    changed_last[:, -1] += 1.0
    mask = model.causal_mask[:6, :6]
    with torch.no_grad():
        y, y_changed = model.transformer(x, mask), model.transformer(changed_last, mask)
    assert torch.equal(y[:, :-1], y_changed[:, :-1]) and not torch.equal(y[:, -1], y_changed[:, -1])


@pytest.mark.parametrize("settings", [{}, {"targets": ("q", "v", "out"), "mlp": True}], ids=["default", "q-v-out-mlp"])
def test_merge_keeps_outputs(plain, batch, settings):
    model = train(tuned(plain, **settings), batch, steps=3)
    assert all(m.lora_B.abs().max() > 0 for m in lora.lora_modules(model))  # the updates are not zero
    unmerged = features(model, batch)
    lora.merge_lora(model)
    for ours, reference in zip(features(model, batch), unmerged):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_lora_dropout_acts_only_in_training(plain, batch):
    model = tuned(plain, dropout=0.5)
    for module in lora.lora_modules(model):
        torch.nn.init.normal_(module.lora_B)  # make the updates non-zero
    no_dropout = copy.deepcopy(model)
    for module in lora.lora_modules(no_dropout):
        module.lora_dropout = torch.nn.Identity()
    images = batch[0]
    with torch.no_grad():
        model.train()
        assert not torch.equal(model.encode_image(images), no_dropout.encode_image(images))
        model.eval()
        assert torch.equal(model.encode_image(images), no_dropout.encode_image(images))


def test_eval_does_not_merge(plain, batch):
    model = train(tuned(plain), batch, steps=2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.eval()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_lora_state_dict_holds_exactly_the_trainable_tensors(plain):
    model = tuned(plain, mlp=True)
    state = lora.lora_state_dict(model)
    assert sum(t.numel() for t in state.values()) == lora.count_trainable(model) > 0
    assert all("lora_" in name for name in state)


def test_state_dict_round_trips_into_a_fresh_model(plain, batch):
    trained = train(tuned(plain), batch, steps=2)
    fresh = tuned(plain, seed=1)
    assert not torch.equal(features(fresh, batch)[0], features(trained, batch)[0])
    lora.load_lora_state_dict(fresh, lora.lora_state_dict(trained))
    for ours, reference in zip(features(fresh, batch), features(trained, batch)):
        assert torch.equal(ours, reference)


KEY = "visual.transformer.resblocks.1.attn.lora_B"


@pytest.mark.parametrize("corrupt", ["missing", "unexpected", "shape"])
def test_a_bad_state_dict_is_refused_naming_the_key(plain, corrupt):
    state = dict(lora.lora_state_dict(tuned(plain)))
    key = KEY
    if corrupt == "missing":
        del state[key]
    elif corrupt == "unexpected":
        key = KEY.replace("lora_B", "lora_C")
        state[key] = torch.zeros(1)
    else:
        state[key] = torch.zeros(3 * TINY.vision_width, 8)  # saved with r = 8
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        lora.load_lora_state_dict(tuned(plain), state)


@pytest.mark.parametrize("kwargs, argument", [
    ({"encoder": "vision"}, "encoder"), ({"targets": ("q", "x")}, "targets"), ({"targets": "qv"}, "targets"),
    ({"r": 0}, "r="), ({"alpha": 0}, "alpha="), ({"dropout": 1.0}, "dropout=")])
def test_bad_arguments_are_refused_naming_the_argument(plain, kwargs, argument):
    with pytest.raises(ValueError, match=re.escape(argument)):
        tuned(plain, **kwargs)


def test_loading_into_a_merged_model_is_refused(plain):
    model = lora.merge_lora(tuned(plain))
    with pytest.raises(ValueError, match="merged"):
        lora.load_lora_state_dict(model, lora.lora_state_dict(tuned(plain)))


def test_applying_twice_is_refused(plain):
    with pytest.raises(ValueError, match="already"):
        lora.apply_lora(tuned(plain))


def test_under_bf16_autocast_the_tuned_model_at_init_is_zero_shot_clip(plain, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ours, reference in zip(features(tuned(plain), batch), features(plain, batch)):
            assert torch.equal(ours, reference)


def test_under_bf16_autocast_lora_gets_fp32_gradients(plain, batch):
    model = tuned(plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_loss(model, batch)
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert all(g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def test_trainable_parameter_count_vit_b16():
    with torch.device("meta"):  # sizes only, no memory
        model = lora.apply_lora(CLIP(CLIPConfig()))  # defaults: ViT-B/16, both towers, r = 4, q, k, v, out
    # Per block of width D: q/k/v share A (r x D) with B (3D x r), out_proj has A (r x D) and B (D x r): 6 r D.
    # Image tower 12 blocks of D = 768, text tower 12 blocks of D = 512: 6 * 4 * (12 * 768 + 12 * 512) = 368,640.
    assert lora.count_trainable(model) == 6 * 4 * (12 * 768 + 12 * 512) == 368_640


def test_released_init_draws_the_qkv_update_at_random_so_step_0_is_not_zero_shot_clip(plain, batch):
    model = tuned(plain, encoder="both", init="released")
    for ours, reference in zip(features(model, batch), features(plain, batch)):
        assert not torch.allclose(ours, reference, rtol=0, atol=1e-6)
    for attn in [block.attn for tower in (model.visual.transformer, model.transformer) for block in tower.resblocks]:
        r, width = attn.lora_A.shape
        for matrix, fan_in, fan_out in ((attn.lora_A, width, r), (attn.lora_B, r, 3 * width)):  # xavier, gain 1
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert matrix.abs().max() <= bound and matrix.abs().max() > 0.8 * bound
        assert torch.equal(attn.out_proj.lora_B, torch.zeros_like(attn.out_proj.lora_B))  # out_proj: B = 0
        assert 0 < attn.out_proj.lora_A.abs().max() <= 1 / width ** 0.5  # kaiming-uniform(a=sqrt 5): 1/sqrt(fan_in)


def test_unknown_init_is_refused(plain):
    with pytest.raises(ValueError, match="init='xavier'"):
        tuned(plain, init="xavier")


# ---- the same LoRA on OpenAI's `clip` (a replica), open_clip's CLIP and ours; models it refuses ------------------


def randomize_B(model):
    for module in lora.lora_modules(model):
        torch.nn.init.normal_(module.lora_B, std=0.1)  # B = 0 would leave the low-rank path untested
    return model


@pytest.mark.parametrize("kind", ["open_clip", "openai"])
@pytest.mark.parametrize("settings", [{}, {"targets": ("out",)}, {"targets": ("k",), "mlp": True}],
                         ids=["default", "out", "k-mlp"])
def test_lora_tensors_from_another_clip_give_the_same_features_in_ours(plain, batch, kind, settings):
    reference, ours = reference_and_ours(plain, kind)
    before = features(reference, batch)
    saved = lora.lora_state_dict(randomize_B(tuned(reference, **settings)))
    tuned_reference = tuned(reference, **settings)
    lora.load_lora_state_dict(tuned_reference, saved)
    ours = tuned(ours, seed=1, **settings)
    lora.load_lora_state_dict(ours, saved)
    for a, b, zero_shot in zip(features(ours, batch), features(tuned_reference, batch), before):
        assert not torch.allclose(b, zero_shot, atol=1e-3)  # every requested target acts, "out" alone included
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["open_clip", "openai"])
def test_on_another_clip_lora_starts_at_zero_shot_trains_every_tensor_and_merges(plain, batch, kind):
    reference, _ = reference_and_ours(plain, kind)
    model = tuned(reference, mlp=True)
    for ours, zero_shot in zip(features(model, batch), features(reference, batch)):
        torch.testing.assert_close(ours, zero_shot, rtol=0, atol=1e-5)  # SDPA, not MultiheadAttention's kernels
    clip_loss(model, batch).backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 4 * 2  # towers, blocks, (q/k/v, out, c_fc, c_proj), (A, B)
    assert all(p.grad is not None for _, p in trainable)  # A's is zero while B = 0, B's is not:
    assert all(p.grad.abs().max() > 0 for name, p in trainable if "lora_B" in name)
    unmerged = features(train(model, batch, steps=2), batch)
    lora.merge_lora(model)
    for merged, reference_features in zip(features(model, batch), unmerged):
        torch.testing.assert_close(merged, reference_features, rtol=0, atol=1e-5)


def module_tree(*path):
    """Nested modules along `path` (as Hugging Face's CLIPModel: vision_model.encoder.layers) ending in a block."""
    return nn.ModuleDict({path[0]: module_tree(*path[1:])}) if path else nn.ModuleList([nn.Linear(8, 8)])


@pytest.mark.parametrize("model, found", [
    (nn.Sequential(nn.Linear(8, 8)), r"Sequential has no visual\.transformer\.resblocks"),
    (torchvision.models.VisionTransformer(32, 8, 1, 2, 16, 32), r"VisionTransformer has no visual"),
    (module_tree("vision_model", "encoder", "layers"), r"\['vision_model'\]"),
    (module_tree("visual", "transformer", "resblocks"), r"a Linear with attn NoneType"),
])
def test_a_model_not_in_openai_layout_is_refused_unchanged(model, found):
    before = set(model.state_dict())
    with pytest.raises(ValueError, match=found + ".*expected"):
        lora.apply_lora(model, encoder="image")
    assert all(p.requires_grad for p in model.parameters()) and set(model.state_dict()) == before  # unchanged


@pytest.mark.parametrize("change", ["dropout", "bias_k"])
def test_an_attention_lora_cannot_reproduce_is_refused_unchanged(change):
    model = open_clip_model()
    attn = model.transformer.resblocks[1].attn
    if change == "dropout":
        attn.dropout = 0.1
    else:
        attn.bias_k = nn.Parameter(torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match=r"a ResidualAttentionBlock with attn MultiheadAttention"):
        lora.apply_lora(model)
    assert all(p.requires_grad for p in model.parameters()) and not lora.lora_modules(model)


def test_a_model_with_its_text_tower_elsewhere_is_pointed_to_encoder_image():
    model = nn.Module()
    model.visual = open_clip_model().visual  # as open_clip's CoCa, whose text tower is not transformer.resblocks
    for apply in (lora.apply_lora, adapter.apply_adapter):
        with pytest.raises(ValueError, match=r"Module has no transformer\.resblocks.*encoder='image'"):
            apply(model)
    assert lora.lora_modules(lora.apply_lora(model, encoder="image"))


def test_lora_attention_refuses_a_call_other_than_self_attention():
    model = tuned(open_clip_model())
    attn, x = model.transformer.resblocks[0].attn, torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(x, torch.randn(2, 5, 64), x, need_weights=False)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(x, x, x)  # need_weights=True: nn.MultiheadAttention's default, weights we do not compute


# ---- the models copiers hold: fp16/bf16 weights, eval mode, LoRA with adapters ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["openai", "open_clip", "clip_model"])
def test_on_an_fp16_or_bf16_clip_fp32_lora_starts_at_zero_shot_trains_and_merges(plain, batch, kind, dtype):
    images, tokens, labels = batch
    batch = images.to(dtype), tokens, labels
    reference = low_precision_model(plain, kind, dtype)
    zero_shot = features(reference, batch)
    ulp = [torch.finfo(dtype).eps * z.abs().max() for z in zero_shot]  # of the largest entry: fp16/bf16 rounding
    model = lora.apply_lora(copy.deepcopy(reference), mlp=True)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # AdamW's eps is 0 in fp16
    for ours, z, atol in zip(features(model, batch), zero_shot, ulp):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, z, rtol=0, atol=4 * atol)  # SDPA, not MultiheadAttention's kernels
    tuned_features = features(train(model, batch, steps=2), batch)
    for tuned_feature, z, atol in zip(tuned_features, zero_shot, ulp):
        assert tuned_feature.isfinite().all() and (tuned_feature - z).abs().max() > atol
    weight = model.visual.transformer.resblocks[0].attn.in_proj_weight
    lora.merge_lora(model)
    assert weight.dtype == dtype and model.visual.transformer.resblocks[0].attn.in_proj_weight is weight
    for merged, tuned_feature, atol in zip(features(model, batch), tuned_features, ulp):
        torch.testing.assert_close(merged, tuned_feature, rtol=0, atol=8 * atol)


@pytest.mark.parametrize("mode", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", ["openai", "open_clip", "clip_model"])
def test_new_modules_take_the_models_mode(plain, kind, mode):
    model = low_precision_model(plain, kind, torch.float32).train(mode)
    for apply in (lambda m: lora.apply_lora(m, mlp=True, dropout=0.1), adapter.apply_adapter):
        assert all(m.training == mode for m in apply(copy.deepcopy(model)).modules())


@pytest.mark.parametrize("order", [("lora", "adapter"), ("adapter", "lora")], ids=["lora-adapter", "adapter-lora"])
@pytest.mark.parametrize("kind", ["openai", "open_clip", "clip_model"])
def test_lora_and_adapters_applied_in_either_order_both_train(plain, batch, kind, order):
    model = low_precision_model(plain, kind, torch.float32)
    for name in order:
        model = lora.apply_lora(model, mlp=True) if name == "lora" else adapter.apply_adapter(model, dropout=0.0)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 4 * 2 + 2 * 2 * 4  # LoRA's and the adapters', as each alone
    assert sum("lora_" in name for name in trainable) == 2 * 2 * 4 * 2
    for name, p in trainable.items():
        if "lora_B" in name or ".up." in name:
            torch.nn.init.normal_(p, std=0.1)  # both paths acting, so every tensor gets a gradient
    clip_loss(model, batch).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable.values())  # hooks kept


STANDALONE = """
import copy, importlib.util, sys, torch, open_clip
import lora, adapter
assert importlib.util.find_spec("clip_model") is None, "the project is on the path"
torch.manual_seed(0)
config = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, head_width=16, patch_size=8),
              text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 49000, (4, 77))
tokens[:, 10] = 49407  # end of text

def features(model):
    with torch.no_grad():
        return torch.cat([model.encode_image(images), model.encode_text(tokens)])

for apply, save, load in ((lora.apply_lora, lora.lora_state_dict, lora.load_lora_state_dict),
                          (adapter.apply_adapter, adapter.adapter_state_dict, adapter.load_adapter_state_dict)):
    base = open_clip.model.CLIP(**config).eval()
    zero_shot = features(base)
    model = apply(open_clip.model.CLIP(**config), dropout=0.0)
    model.load_state_dict(base.state_dict(), strict=False)  # the same CLIP weights
    model.eval()
    torch.testing.assert_close(features(model), zero_shot, rtol=0, atol=1e-5)  # SDPA, not MultiheadAttention's
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    f, g = model.encode_image(images), model.encode_text(tokens)
    torch.nn.functional.cross_entropy(f @ g.t(), torch.arange(4)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), "a tensor got no gradient"
    optimizer.step()
    tuned = features(model)
    assert not torch.allclose(tuned, zero_shot, atol=1e-4), "a step changed nothing"
    fresh = apply(open_clip.model.CLIP(**config).eval(), dropout=0.0)
    fresh.load_state_dict(base.state_dict(), strict=False)
    load(fresh, save(model))
    assert torch.equal(features(fresh.eval()), tuned), "save/load"
    if apply is lora.apply_lora:
        torch.testing.assert_close(features(lora.merge_lora(model)), tuned, rtol=0, atol=1e-5)

half = open_clip.model.CLIP(**config, cast_dtype=torch.float16).eval()
open_clip.model.convert_weights_to_lp(half)  # as OpenAI's convert_weights (clip.load on CUDA): LayerNorm fp32
images = images.half()
zero_shot = features(half)
for apply in (lora.apply_lora, adapter.apply_adapter):
    model = apply(copy.deepcopy(half))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(m.training for m in model.modules()), "a new module is in training mode"
    assert all(p.dtype == torch.float32 for p in trainable), "fp16 trainable tensors"
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        f, g = model.encode_image(images), model.encode_text(tokens)
        assert f.dtype == g.dtype == torch.float16, "not the model's dtype"
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy((f @ g.t()).float(), torch.arange(4)).backward()
        optimizer.step()
    tuned = features(model)
    assert tuned.isfinite().all() and (tuned - zero_shot).abs().max() > 1e-2, "fp16 steps"
print("tuned")
"""


def test_lora_py_and_adapter_py_copied_alone_tune_open_clip(tmp_path):
    for name in ("lora.py", "adapter.py"):
        shutil.copy(REPOSITORY / name, tmp_path / name)
    (tmp_path / "tune_open_clip.py").write_text(STANDALONE)
    # -E: no PYTHONPATH, so only the script's folder (lora.py, adapter.py) and the installed packages are importable
    done = subprocess.run([sys.executable, "-E", "tune_open_clip.py"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "tuned\n", done.stderr
