"""
Our CLIP towers against OpenAI's reference implementation, side by side in one process, on the same weights.

    pip install --no-deps clip-anytorch      # OpenAI's clip/model.py (else open_clip's copy of it is used)
    python tests/benchmark_clip.py           # ViT-B/16, CPU: forward, and forward+backward with frozen weights

It also times the image step with LoRA (apply_lora, encoder="image") against the frozen tower: LoRA's extra cost.

"Frozen weights" means no weight gradient: only the positional embeddings train, so the backward pass still runs
through every block (as it does for LoRA). Not collected by pytest (no test_ prefix).
"""

import argparse
import importlib.util
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_model  # noqa: E402
import lora  # noqa: E402


def reference_builder():
    """OpenAI's build_model (clip/model.py of the `clip` package, loaded without its heavy __init__), or open_clip's."""
    spec = importlib.util.find_spec("clip")
    if spec and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "model.py")
        module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return "OpenAI clip/model.py", lambda sd: module.build_model(dict(sd)).float().eval()
    import open_clip
    build = open_clip.model.build_model_from_openai_state_dict
    return "open_clip (OpenAI layout)", lambda sd: build(dict(sd)).float().eval()


def best_of(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def forward_backward(encode, inputs, parameters):
    def run():
        for p in parameters:
            p.grad = None
        encode(inputs).square().sum().backward()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    name, build_reference = reference_builder()
    torch.manual_seed(0)
    sd = {k: v.half() for k, v in clip_model.CLIP(clip_model.CLIPConfig()).state_dict().items()}  # as released
    ours, ref = clip_model.build_model(sd), build_reference(sd)
    images = torch.randn(args.images, 3, 224, 224)
    tokens = clip_model.tokenize([clip_model.PROMPT.format(f"class number {i}") for i in range(args.texts)])
    trimmed = clip_model.trim_padding(tokens)
    print(f"# ViT-B/16 on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; reference: {name}")
    print(f"# {args.images} images of 224 px, {args.texts} prompts; best of {args.repeats}; ratio = reference / ours")

    rows = []
    with torch.inference_mode():
        rows.append(("image forward", best_of(lambda: ref.encode_image(images), args.repeats),
                     best_of(lambda: ours.encode_image(images), args.repeats)))
        rows.append(("text forward, 77 tokens", best_of(lambda: ref.encode_text(tokens), args.repeats),
                     best_of(lambda: ours.encode_text(tokens), args.repeats)))
        rows.append(("text forward, trimmed padding", rows[-1][1],
                     best_of(lambda: ours.encode_text(trimmed), args.repeats)))
    for model in (ours, ref):
        model.requires_grad_(False)
        model.visual.positional_embedding.requires_grad_(True)
        model.positional_embedding.requires_grad_(True)
    pos = lambda m: [m.visual.positional_embedding, m.positional_embedding]  # noqa: E731
    rows.append(("image forward+backward", best_of(forward_backward(ref.encode_image, images, pos(ref)), args.repeats),
                 best_of(forward_backward(ours.encode_image, images, pos(ours)), args.repeats)))
    rows.append(("text forward+backward, 77 tokens",
                 best_of(forward_backward(ref.encode_text, tokens, pos(ref)), args.repeats),
                 best_of(forward_backward(ours.encode_text, tokens, pos(ours)), args.repeats)))
    rows.append(("text forward+backward, trimmed", rows[-1][1],
                 best_of(forward_backward(ours.encode_text, trimmed, pos(ours)), args.repeats)))

    # LoRA's extra cost: the same image step with LoRA (its parameters train) against the frozen tower above
    ours_lora = lora.apply_lora(clip_model.build_model(sd), encoder="image")
    lora_params = [p for p in ours_lora.parameters() if p.requires_grad]
    with_lora = best_of(forward_backward(ours_lora.encode_image, images, lora_params), args.repeats)
    frozen = rows[3][2]

    print("| measurement | reference (ms) | ours (ms) | ratio |")
    print("|---|---:|---:|---:|")
    for label, reference, mine in rows:
        print(f"| {label} | {1000 * reference:.0f} | {1000 * mine:.0f} | {reference / mine:.2f} |")
    print(f"\nLoRA on the image tower, forward+backward: {1000 * with_lora:.0f} ms against {1000 * frozen:.0f} ms "
          f"frozen: {with_lora / frozen:.2f}x")


if __name__ == "__main__":
    main()
