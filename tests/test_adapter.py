"""adapter.py, property by property, on a tiny random CLIP (CPU, offline); the parameter count on ViT-B/16; the
same adapters on open_clip's CLIP and OpenAI's `clip`; the models it refuses."""

import copy
import re

import pytest
import torch
import torchvision

import adapter
from clip_model import CLIP, TINY_CONFIG as TINY, CLIPConfig
from lora import count_trainable
from peft_support import clip_loss, features, low_precision_model, reference_and_ours, train


def tuned(plain, seed=0, **kwargs):
    torch.manual_seed(seed)  # the down-projections are drawn at random
    return adapter.apply_adapter(copy.deepcopy(plain), **kwargs).train()


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


def test_only_adapter_parameters_require_grad(plain):
    model = tuned(plain)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if ".adapter." in name}
    assert "logit_scale" not in trainable and len(trainable) == 2 * 2 * 4  # towers, blocks, down/up weight/bias


def test_frozen_weights_receive_no_gradient(plain, batch):
    model = tuned(plain)
    clip_loss(model, batch).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, _ in model.named_parameters() if ".adapter." in name}


def test_every_openai_key_keeps_its_tensor(plain):
    model = copy.deepcopy(plain)
    before = dict(model.named_parameters())
    adapter.apply_adapter(model)
    after = dict(model.named_parameters())
    assert all(after[name] is p for name, p in before.items())  # the very same Parameter objects
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in plain.state_dict().items())


def test_added_keys_all_carry_adapter(plain):
    added = set(tuned(plain).state_dict()) - set(plain.state_dict())
    assert added and all(".adapter." in key for key in added)


def test_one_adapter_is_used_after_attention_and_after_the_mlp(plain):
    block = tuned(plain, scale=0.5).eval().visual.transformer.resblocks[0]
    torch.nn.init.normal_(block.adapter.up.weight)  # a non-zero adapter
    ad, x = block.adapter, torch.randn(2, 5, TINY.vision_width)
    with torch.no_grad():
        h = block.attn.forward(block.ln_1(x))  # .forward: without the adapter's hook
        expected = x + (h + 0.5 * ad(h))  # summed in the order the hook and the block sum
        m = block.mlp.forward(block.ln_2(expected))
        expected = expected + (m + 0.5 * ad(m))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert "used twice: after attn and after mlp" in repr(block)  # print(model) shows it


def test_the_text_tower_stays_causal(plain):
    model = tuned(plain, encoder="text").eval()
    for name, p in model.named_parameters():
        if ".adapter.up." in name:
            torch.nn.init.normal_(p)  # make the adapters non-zero
    x = torch.randn(1, 6, TINY.transformer_width)
    changed_last = x.clone()
    changed_last[:, -1] += 1.0
    mask = model.causal_mask[:6, :6]
    with torch.no_grad():
        y, y_changed = model.transformer(x, mask), model.transformer(changed_last, mask)
    assert torch.equal(y[:, :-1], y_changed[:, :-1]) and not torch.equal(y[:, -1], y_changed[:, -1])


def test_adapter_state_dict_holds_exactly_the_trainable_tensors(plain):
    model = tuned(plain)
    state = adapter.adapter_state_dict(model)
    assert sum(t.numel() for t in state.values()) == count_trainable(model) > 0
    assert all(".adapter." in name for name in state)


def test_state_dict_round_trips_into_a_fresh_model(plain, batch):
    trained = train(tuned(plain), batch, steps=2)
    fresh = tuned(plain, seed=1)
    assert not torch.equal(features(fresh, batch)[0], features(trained, batch)[0])
    adapter.load_adapter_state_dict(fresh, adapter.adapter_state_dict(trained))
    for ours, reference in zip(features(fresh, batch), features(trained, batch)):
        assert torch.equal(ours, reference)


KEY = "visual.transformer.resblocks.1.adapter.up.weight"


@pytest.mark.parametrize("corrupt", ["missing", "unexpected", "shape"])
def test_a_bad_state_dict_is_refused_naming_the_key(plain, corrupt):
    state = dict(adapter.adapter_state_dict(tuned(plain)))
    key = KEY
    if corrupt == "missing":
        del state[key]
    elif corrupt == "unexpected":
        key = KEY.replace("up", "side")
        state[key] = torch.zeros(1)
    else:
        state[key] = torch.zeros(TINY.vision_width, 32)  # saved with bottleneck = 32
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        adapter.load_adapter_state_dict(tuned(plain), state)


@pytest.mark.parametrize("kwargs, argument", [
    ({"encoder": "vision"}, "encoder"), ({"bottleneck": 0}, "bottleneck="), ({"scale": 0}, "scale="),
    ({"dropout": 1.0}, "dropout=")])
def test_bad_arguments_are_refused_naming_the_argument(plain, kwargs, argument):
    with pytest.raises(ValueError, match=re.escape(argument)):
        tuned(plain, **kwargs)


def test_applying_twice_is_refused(plain):
    with pytest.raises(ValueError, match="already"):
        adapter.apply_adapter(tuned(plain))


def test_under_bf16_autocast_the_tuned_model_at_init_is_zero_shot_clip(plain, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ours, reference in zip(features(tuned(plain), batch), features(plain, batch)):
            assert torch.equal(ours, reference)


def test_under_bf16_autocast_adapters_get_fp32_gradients(plain, batch):
    model = tuned(plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_loss(model, batch)
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if ".adapter.up." in name]
    assert all(g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def test_trainable_parameter_count_vit_b16():
    with torch.device("meta"):  # sizes only, no memory
        model = adapter.apply_adapter(CLIP(CLIPConfig()))  # defaults: ViT-B/16, both towers, bottleneck 64
    # Per block of width D, bottleneck b: down D b + b, up b D + D, so 2 D b + b + D.
    # Image tower 12 blocks of D = 768, text tower 12 blocks of D = 512, b = 64:
    # 12 * (2*768*64 + 64 + 768) + 12 * (2*512*64 + 64 + 512) = 1,189,632 + 793,344 = 1,982,976.
    assert count_trainable(model) == 12 * (2 * 768 * 64 + 64 + 768) + 12 * (2 * 512 * 64 + 64 + 512) == 1_982_976


# ---- the same adapters on OpenAI's `clip` (a replica), open_clip's CLIP and ours; models it refuses -------------


@pytest.mark.parametrize("kind", ["open_clip", "openai"])
def test_adapters_from_another_clip_give_the_same_features_in_ours(plain, batch, kind):
    reference, ours = reference_and_ours(plain, kind)
    zero_shot = features(reference, batch)
    trained = train(tuned(reference), batch, steps=2)
    ours = tuned(ours, seed=1)
    adapter.load_adapter_state_dict(ours, adapter.adapter_state_dict(trained))
    for a, b, before in zip(features(ours, batch), features(trained, batch), zero_shot):
        assert not torch.allclose(b, before, atol=1e-3)  # the adapters act on both towers
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["open_clip", "openai"])
def test_on_another_clip_adapters_start_at_zero_shot_and_every_tensor_gets_a_gradient(plain, batch, kind):
    reference, _ = reference_and_ours(plain, kind)
    model = tuned(reference)
    for ours, zero_shot in zip(features(model, batch), features(reference, batch)):
        assert torch.equal(ours, zero_shot)
    clip_loss(model, batch).backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 4 and all(p.grad is not None for _, p in trainable)
    assert all(p.grad.abs().max() > 0 for name, p in trainable if ".up." in name)  # down's is zero while up = 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["openai", "open_clip", "clip_model"])
def test_on_an_fp16_or_bf16_clip_fp32_adapters_start_at_zero_shot_and_train(plain, batch, kind, dtype):
    images, tokens, labels = batch
    batch = images.to(dtype), tokens, labels
    reference = low_precision_model(plain, kind, dtype)
    zero_shot = features(reference, batch)
    model = adapter.apply_adapter(copy.deepcopy(reference))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # AdamW's eps is 0 in fp16
    for ours, z in zip(features(model, batch), zero_shot):
        assert ours.dtype == dtype and torch.equal(ours, z)  # h + scale * 0
    for tuned_feature, z in zip(features(train(model, batch, steps=2), batch), zero_shot):
        ulp = torch.finfo(dtype).eps * z.abs().max()  # of the largest entry: fp16/bf16 rounding
        assert tuned_feature.isfinite().all() and (tuned_feature - z).abs().max() > ulp


def test_a_deep_copy_has_its_own_adapters(plain, batch):
    model = tuned(plain)
    duplicate = copy.deepcopy(model)
    for name, p in duplicate.named_parameters():
        if ".adapter.up." in name:
            torch.nn.init.normal_(p)  # the hooks of the copy must call the copy's adapters
    assert torch.equal(features(model, batch)[0], features(plain, batch)[0])
    assert not torch.equal(features(duplicate, batch)[0], features(plain, batch)[0])


@pytest.mark.parametrize("model, found", [
    (torch.nn.Sequential(torch.nn.Linear(8, 8)), r"Sequential has no visual\.transformer\.resblocks"),
    (torchvision.models.VisionTransformer(32, 8, 1, 2, 16, 32), r"VisionTransformer has no visual"),
    (torch.nn.ModuleDict({"vision_model": torch.nn.ModuleDict({"encoder": torch.nn.Linear(8, 8)})}),
     r"\['vision_model'\]"),
    (torch.nn.ModuleDict({"visual": torch.nn.ModuleDict({"transformer": torch.nn.ModuleDict(
        {"resblocks": torch.nn.ModuleList([torch.nn.Linear(8, 8)])})})}), r"a block is a Linear"),
])
def test_a_model_not_in_openai_layout_is_refused_unchanged(model, found):
    before = set(model.state_dict())
    with pytest.raises(ValueError, match=found + ".*expected"):
        adapter.apply_adapter(model, encoder="image")
    assert all(p.requires_grad for p in model.parameters()) and set(model.state_dict()) == before
