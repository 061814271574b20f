"""The README's "Use it in your code" snippets run as printed (tiny random models, nothing downloaded)."""

import re
from pathlib import Path

import torch
import torch.nn.functional as F

import clip_model
import lora

README = Path(__file__).resolve().parent.parent / "README.md"


def snippets():
    """The python code blocks of the README's "Use it in your code" section, in order."""
    section = README.read_text().split("## Use it in your code\n")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_three_snippets():
    assert len(snippets()) == 3


def test_the_loss_snippet_gives_sit_loss_with_a_gradient():
    torch.manual_seed(0)
    model = clip_model.CLIP(clip_model.TINY_CONFIG)
    names = ["cat", "dog", "ship", "tree", "car"]
    given = dict(model=model, images=torch.randn(4, 3, 32, 32), labels=torch.tensor([3, 1, 3, 4]),
                 class_tokens=clip_model.tokenize([f"a bad photo of a {c}." for c in names]))
    exec(snippets()[0], given)
    f, g, loss = given["f"], given["g"], given["loss"]
    assert torch.equal(given["visible"], torch.tensor([1, 3, 4]))
    positions = torch.tensor([1, 0, 1, 2])  # of labels 3, 1, 3, 4 among the visible classes 1, 3, 4
    expected = F.cross_entropy(model.logit_scale.exp() * f @ g.t(), positions)  # the softmax over C_B alone
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.visual.proj.grad.abs().max() > 0 and model.logit_scale.grad is None  # s stays frozen


def test_the_lora_snippet_tunes_open_clip_and_saves_only_lora(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = snippets()[1]
    assert 'pretrained="openai"' in code
    given = {}
    exec(code.replace('pretrained="openai"', "pretrained=None"), given)  # the same model, random weights
    model, saved = given["model"], torch.load(tmp_path / "lora.pt")
    assert lora.count_trainable(model) == 368_640  # ViT-B/16, both towers, r = 4 (as tests/test_lora.py counts)
    assert saved.keys() == lora.lora_state_dict(model).keys() and all("lora_" in k for k in saved)
    assert {id(p) for group in given["optimizer"].param_groups for p in group["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}


def test_the_split_snippet_deals_every_sample_once(capsys):
    given = {}
    exec(snippets()[2], given)
    split = given["split"]
    dealt = [i for task in split.tasks for i in task]
    assert len(split.tasks) == 5 and sorted(dealt) == list(range(5000))  # 100 classes in 5 tasks: none dropped
    assert capsys.readouterr().out.count("task ") == 5
