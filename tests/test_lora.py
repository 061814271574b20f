"""lora.py, property by property, on a tiny random CLIP (CPU, offline); the parameter count on ViT-B/16."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import lora
from clip_model import CLIP, TINY_CONFIG as TINY, CLIPConfig
from peft_support import clip_loss, features, train


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
