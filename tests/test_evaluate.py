"""evaluate.py: the lifelong metrics on hand-computed values, seen-class accuracy, zero-shot transfer, and the
analysis commands (table, grid, plot, plot-grad) on small hand-made run folders."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import evaluate
import stream
from evaluate import a_auc, a_avg, a_last, f_last, lifelong_metrics, top1_on_seen

TINY = clip_model.TINY_CONFIG


# -----------------------------------------------------------------------------
# metrics (released formulas)


def test_a_auc_is_the_mean_of_the_anytime_accuracies():
    assert a_auc([0.2, 0.4, 0.9]) == pytest.approx(0.5)


def test_a_avg_is_the_mean_of_the_task_end_accuracies():
    assert a_avg([0.8, 0.6, 0.4]) == pytest.approx(0.6)


def test_a_last_is_the_last_task_end_accuracy():
    assert a_last([0.8, 0.6, 0.4]) == 0.4


def test_f_last_averages_best_earlier_minus_last_over_classes_seen_before_the_last_task():
    class_acc = [[0.9, None, None],
                 [0.5, 0.8, None],
                 [0.3, 0.6, 0.7]]  # class 2 first appears in the last task: excluded
    assert f_last(class_acc) == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)


def test_f_last_uses_the_best_earlier_accuracy_not_the_previous_one():
    assert f_last([[0.9], [0.5], [0.4]]) == pytest.approx(0.5)


def test_f_last_skips_classes_whose_earlier_accuracy_was_never_above_zero():
    assert f_last([[0.0, 0.5], [0.0, 0.4], [0.9, 0.1]]) == pytest.approx(0.4)


def test_f_last_is_negative_when_classes_improve():
    assert f_last([[0.5], [0.7]]) == pytest.approx(-0.2)


def test_f_last_is_undefined_with_a_single_task():
    assert f_last([[0.5, 0.7]]) is None


def test_lifelong_metrics_reports_the_four_numbers():
    metrics = lifelong_metrics([0.2, 0.4], [0.6, 0.4], [[0.6, None], [0.2, 0.6]])
    assert metrics == pytest.approx({"A_auc": 0.3, "A_avg": 0.5, "A_last": 0.4, "F_last": 0.4})


# -----------------------------------------------------------------------------
# top-1 among the seen classes


def unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=-1)


TEXT = torch.eye(3)  # class c's text feature is e_c; top1_on_seen takes the rows of the seen classes


def test_top1_on_seen_counts_correct_predictions_per_class():
    images = torch.stack([unit(1, 0.1, 0), unit(1, 0, 0.2),      # class 0, both right
                          unit(0.1, 1, 0), unit(0.5, 0.1, 0)])   # class 1: right, then predicted 0
    acc, per_class = top1_on_seen(images, torch.tensor([0, 0, 1, 1]), TEXT[[0, 1]], [0, 1])
    assert (acc, per_class) == (pytest.approx(0.75), {0: 1.0, 1: 0.5})


def test_an_unseen_class_is_never_predicted():
    images = torch.stack([unit(0.3, 0, 1), unit(0, 0.3, 1)])  # nearest text: class 2, which is unseen
    acc, _ = top1_on_seen(images, torch.tensor([0, 1]), TEXT[[0, 1]], [0, 1])
    assert acc == 1.0


def test_test_images_of_unseen_classes_are_not_evaluated():
    images = torch.stack([unit(1, 0, 0), unit(0, 0, 1)])
    acc, per_class = top1_on_seen(images, torch.tensor([0, 2]), TEXT[[0, 1]], [0, 1])
    assert (acc, per_class) == (1.0, {0: 1.0})


def test_per_class_accuracy_only_for_seen_classes_with_test_images():
    _, per_class = top1_on_seen(torch.stack([unit(1, 0, 0)]), torch.tensor([0]), TEXT, [0, 1, 2])
    assert set(per_class) == {0}


def test_text_rows_follow_the_order_of_the_seen_classes():
    images = torch.stack([unit(0, 0, 1), unit(1, 0.2, 0)])  # classes 2 and 0
    acc, per_class = top1_on_seen(images, torch.tensor([2, 0]), TEXT[[2, 0]], [2, 0])  # seen in order 2, 0
    assert (acc, per_class) == (1.0, {2: 1.0, 0: 1.0})


# -----------------------------------------------------------------------------
# hand-made run folders


def write_run(path, peft="lora", encoder="image", visible="batch", seed=1, metrics=(0.5, 0.5, 0.5, 0.1),
              status="finished", dataset="cifar100", **config):
    """A results.json as train_online.py writes it: 4 classes, 2 tasks (classes 0, 1 disjoint; 2, 3 blurry)."""
    path.mkdir(parents=True)
    results = {
        "config": {"dataset": dataset, "data_root": "data", "model": "ViT-B/16", "peft": peft, "encoder": encoder,
                   "visible_classes": visible, "scenario": "si-blurry", "n_tasks": 2, "n": 50, "m": 10,
                   "seed": seed, "batch_size": 4, "online_iter": 1, "lr": 5e-4, "eval_period": 8, "memory_size": 0,
                   **config},
        "status": status, "class_names": ["apple", "bus", "cat", "dog"],
        "seen_classes": [2, 0, 1, 3], "disjoint_classes": [[0], [1]], "blurry_classes": [[2], [3]],
        "anytime": [{"samples": 8, "acc": 0.5}, {"samples": 16, "acc": 0.4}, {"samples": 24, "acc": 0.45}],
        "task_end_samples": [12, 24], "task_acc": [0.6, 0.45],
        "class_acc": [[0.7, None, 0.5, None], [0.2, 0.6, 0.4, 0.6]],
    }
    results.update(zip(evaluate.METRICS, metrics))
    (path / "results.json").write_text(json.dumps(results))
    return path


def run_cli(capsys, *argv):
    code = evaluate.main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def table_row(out, prefix):
    (row,) = [line for line in out.splitlines() if line.startswith(prefix)]
    return row


def test_table_reports_mean_and_sample_std_over_seeds_in_percent(tmp_path, capsys):
    for seed, metrics in [(1, (0.5, 0.1, 0.4, 0.05)), (2, (0.6, 0.2, 0.4, 0.10)), (3, (0.7, 0.3, 0.4, 0.15))]:
        write_run(tmp_path / f"seed{seed}", seed=seed, metrics=metrics)
    code, out, _ = run_cli(capsys, "table", *sorted(tmp_path.iterdir()))
    assert code == 0
    assert table_row(out, "| cifar100 | lora |") == (
        "| cifar100 | lora | image | batch | si-blurry | 3 | 60.00 ± 10.00 | 20.00 ± 10.00 | 40.00 ± 0.00 "
        "| 10.00 ± 5.00 |")


def test_table_gives_std_zero_for_a_single_seed(tmp_path, capsys):
    write_run(tmp_path / "run", metrics=(0.25, 0.5, 0.125, 0.0625))
    _, out, _ = run_cli(capsys, "table", tmp_path / "run")
    assert "| 1 | 25.00 ± 0.00 | 50.00 ± 0.00 | 12.50 ± 0.00 | 6.25 ± 0.00 |" in out


def test_table_groups_runs_by_configuration(tmp_path, capsys):
    write_run(tmp_path / "a1", visible="batch", seed=1)
    write_run(tmp_path / "a2", visible="batch", seed=2)
    write_run(tmp_path / "b1", visible="all", seed=1)
    _, out, _ = run_cli(capsys, "table", tmp_path)  # a parent folder is searched for run folders
    seeds = {row.split(" | ")[3]: row.split(" | ")[5] for row in out.splitlines()[2:]}
    assert seeds == {"batch": "2", "all": "1"}


def test_table_warns_when_a_row_mixes_the_two_recipes(tmp_path, capsys):
    write_run(tmp_path / "ours", seed=1, recipe="ours", double_softmax=False)
    write_run(tmp_path / "released", seed=2, recipe="released", double_softmax=True)
    _, _, err = run_cli(capsys, "table", tmp_path)
    assert "mixes runs with different recipe, double_softmax" in err


def test_table_marks_a_metric_defined_by_only_some_seeds(tmp_path, capsys):
    write_run(tmp_path / "s1", seed=1, metrics=(0.5, 0.5, 0.5, 0.2))
    write_run(tmp_path / "s2", seed=2, metrics=(0.5, 0.5, 0.5, None))
    _, out, _ = run_cli(capsys, "table", tmp_path)
    assert out.splitlines()[2].endswith("| 20.00 ± 0.00 (n=1) |")


def test_table_leaves_out_towers_and_visible_classes_for_zero_shot_clip(tmp_path, capsys):
    write_run(tmp_path / "zs", peft="none", encoder="both", visible="batch")
    _, out, _ = run_cli(capsys, "table", tmp_path / "zs")
    assert out.splitlines()[2].startswith("| cifar100 | none | – | – | si-blurry | 1 |")


def test_table_skips_unfinished_runs(tmp_path, capsys):
    write_run(tmp_path / "done", seed=1)
    write_run(tmp_path / "stopped", seed=2, status="interrupted")
    _, out, err = run_cli(capsys, "table", tmp_path)
    assert table_row(out, "| cifar100").split(" | ")[5] == "1" and "stopped" in err


@pytest.mark.parametrize("case", ["missing folder", "no results.json"])
def test_table_bad_input_is_one_clear_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing folder":
        run.mkdir()
    code, out, err = run_cli(capsys, "table", run)
    assert (code, out, len(err.splitlines())) == (1, "", 1) and str(run) in err


def test_table_skips_a_malformed_results_json_with_one_warning_naming_it(tmp_path, capsys):
    write_run(tmp_path / "good", seed=1)
    for name, text in (("malformed", '{"config": '), ("missing keys", '{"config": {}}'), ("a list", "[1]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(text)
    code, out, err = run_cli(capsys, "table", tmp_path)
    assert code == 0 and table_row(out, "| cifar100").split(" | ")[5] == "1"
    warnings = err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: skipping ") for w in warnings)
    assert all(str(tmp_path / name / "results.json") in err for name in ("malformed", "missing keys", "a list"))


# -----------------------------------------------------------------------------
# grid


def test_grid_prints_every_configuration_for_five_seeds(capsys):
    _, out, _ = run_cli(capsys, "grid", "--dataset", "cifar100")
    assert len(out.splitlines()) == (2 * 3 * 2 + 1) * 5


def test_grid_commands_write_to_distinct_folders(capsys):
    _, out, _ = run_cli(capsys, "grid", "--dataset", "cifar100")
    outs = [line.split("--out ")[1].split()[0] for line in out.splitlines()]
    assert len(set(outs)) == len(outs)


def test_grid_includes_the_zero_shot_baseline_for_each_seed(capsys):
    _, out, _ = run_cli(capsys, "grid", "--dataset", "cifar100")
    assert sum("--peft none" in line for line in out.splitlines()) == 5


def test_grid_passes_the_data_root_on(capsys):
    _, out, _ = run_cli(capsys, "grid", "--dataset", "imagenet-r", "--data-root", "/data/my images")
    assert all("--data-root '/data/my images'" in line for line in out.splitlines())


def test_grid_passes_the_released_recipe_on_into_its_own_folders(capsys, tmp_path):
    _, out, _ = run_cli(capsys, "grid", "--dataset", "cifar100", "--recipe", "released", "--runs-root", tmp_path)
    lines = out.splitlines()
    assert len(lines) == 65 and all("--recipe released" in line for line in lines)
    assert all(f"--out {tmp_path}/cifar100-released/" in line for line in lines)


def finish(out, status):
    """A run folder as train_online.py leaves it, with this status."""
    os.makedirs(out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"status": status}, f)


def test_grid_skip_finished_prints_only_what_is_missing(capsys, tmp_path):
    commands = [c for _, c in evaluate.grid_runs("cifar100", runs_root=str(tmp_path))]
    finish(tmp_path / "cifar100" / "lora-image-batch" / "seed1", "finished")
    finish(tmp_path / "cifar100" / "lora-image-batch" / "seed2", "interrupted")
    finish(tmp_path / "cifar100" / "zero-shot" / "seed5", "failed")
    (tmp_path / "cifar100" / "lora-image-batch" / "seed3").mkdir()  # started, nothing written yet
    _, out, err = run_cli(capsys, "grid", "--dataset", "cifar100", "--runs-root", tmp_path, "--skip-finished")
    assert out.splitlines() == commands[1:] and "skipping 1 finished" in err


def slurm(capsys, tmp_path, *extra):
    code, script, _ = run_cli(capsys, "grid", "--dataset", "cifar100", "--runs-root", tmp_path, "--slurm", *extra)
    assert code == 0
    path = tmp_path / "grid.sbatch"
    path.write_text(script)
    return script, path


def test_grid_slurm_script_is_valid_bash_with_one_array_task_per_command(capsys, tmp_path):
    finish(tmp_path / "cifar100" / "lora-image-batch" / "seed1", "finished")
    script, path = slurm(capsys, tmp_path, "--skip-finished", "--partition", "gpu", "--time", "01:00:00")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    headers = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --array=0-63" in headers and "#SBATCH --gres=gpu:1" in headers
    assert "#SBATCH --partition=gpu" in headers and "#SBATCH --time=01:00:00" in headers
    log = next(line for line in headers if line.startswith("#SBATCH --output="))
    assert os.path.isdir(os.path.dirname(log.split("=", 1)[1]))  # SLURM would not create it


@pytest.mark.parametrize("task", [0, 17, 63])
def test_grid_slurm_array_task_k_runs_the_kth_command(capsys, tmp_path, task):
    finish(tmp_path / "cifar100" / "lora-image-batch" / "seed1", "finished")
    commands = [c for _, c in evaluate.grid_runs("cifar100", runs_root=str(tmp_path))][1:]  # --skip-finished
    _, path = slurm(capsys, tmp_path, "--skip-finished")
    bin_dir = tmp_path / "bin"  # a stand-in python on PATH that records its arguments
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/called\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(task)}
    assert subprocess.run(["bash", path], env=env).returncode == 0
    assert (tmp_path / "called").read_text().splitlines() == shlex.split(commands[task])[1:]


def test_grid_slurm_script_refuses_a_task_without_a_command(capsys, tmp_path):
    _, path = slurm(capsys, tmp_path)
    result = subprocess.run(["bash", path], env={**os.environ, "SLURM_ARRAY_TASK_ID": "65"}, capture_output=True,
                            text=True)
    assert result.returncode == 1 and "no run for array task 65" in result.stderr


# -----------------------------------------------------------------------------
# gradient analysis


def write_grad(run, visible):
    """grad.jsonl of 4 steps over 2 tasks: under 'all', seen classes absent from the batch get a negative part only."""
    steps = [(0, [2, 0], [2, 0]), (0, [2, 0], [0]), (1, [2, 0, 1], [1]), (1, [2, 0, 1, 3], [1, 3])]
    with open(run / "grad.jsonl", "w") as f:
        for step, (task, seen, in_batch) in enumerate(steps):
            classes = seen if visible == "all" else [c for c in seen if c in in_batch]
            present = [c in in_batch for c in classes]
            f.write(json.dumps({"step": step, "samples": 4 * (step + 1), "task": task, "classes": classes,
                                "in_batch": present, "pos": [0.5 if p else 0.0 for p in present],
                                "neg": [0.25] * len(classes)}) + "\n")


def test_gradient_summary_shows_negative_only_gradient_on_absent_classes(tmp_path):
    run = write_run(tmp_path / "run", visible="all")
    write_grad(run, "all")
    absent = evaluate.gradient_summary(evaluate.read_grad(run / "grad.jsonl"))["absent"]
    # steps 1, 2, 3 leave out 1, 2 and 2 seen classes
    assert (absent["entries"], absent["pos"], absent["neg"]) == (5, 0.0, 0.25)


def test_gradient_summary_has_no_absent_classes_under_sit(tmp_path):
    run = write_run(tmp_path / "run", visible="batch")
    write_grad(run, "batch")
    assert evaluate.gradient_summary(evaluate.read_grad(run / "grad.jsonl"))["absent"]["entries"] == 0


def test_malformed_grad_line_is_named(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    (run / "grad.jsonl").write_text('{"step": 0}\n')
    code, _, err = run_cli(capsys, "plot-grad", run)
    assert code == 1 and "grad.jsonl:1" in err


# -----------------------------------------------------------------------------
# plots (matplotlib is optional)


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = [write_run(tmp_path / f"seed{s}", seed=s) for s in (1, 2)]
    code, _, _ = run_cli(capsys, "plot", *runs, "--out", tmp_path / "plot.png")
    assert code == 0 and Image.open(tmp_path / "plot.png").format == "PNG"


def test_plot_grad_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", visible="all")
    write_grad(run, "all")
    code, _, _ = run_cli(capsys, "plot-grad", run)
    assert code == 0 and Image.open(run / "grad.png").format == "PNG"


def test_plots_without_matplotlib_say_how_to_install_it(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.colors", "matplotlib.patches"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import matplotlib...` fail
    run = write_run(tmp_path / "run")
    code, _, err = run_cli(capsys, "plot", run)
    assert (code, "pip install matplotlib" in err, (run / "plot.png").exists()) == (1, True, False)


# -----------------------------------------------------------------------------
# zero-shot transfer and peft.pt


def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(clip_model.CLIP(TINY).state_dict(), path)
    return str(path)


def image_folder(root, classes=("red apple", "blue sky", "green leaf"), per_class=3):
    """ROOT/{train,test}/<class>/*.png of random colours."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_zero_shot_transfer_equals_per_image_classification(tmp_path):
    import open_clip
    root = image_folder(tmp_path / "images")
    model = clip_model.load(tiny_checkpoint(tmp_path))
    accs = evaluate.zero_shot_transfer(model, ["imagefolder"], str(root), "a photo of {}.", "cpu",
                                       batch_size=4, workers=0)
    test = stream.load_dataset("imagefolder", str(root), train=False)
    transform = open_clip.transform.image_transform(TINY.image_size, is_train=False)  # OpenAI's, on PIL
    with torch.no_grad():
        text = clip_model.class_text_features(model, test.classes, "a photo of {}.")
        correct = [(F.normalize(model.encode_image(transform(img)[None]), dim=-1) @ text.t()).argmax().item() == y
                   for img, y in test]
    assert accs == {"imagefolder": pytest.approx(sum(correct) / len(correct))}


CALTECH101_FOLDERS = (
    "BACKGROUND_Google Faces Faces_easy Leopards Motorbikes accordion airplanes anchor ant barrel bass beaver "
    "binocular bonsai brain brontosaurus buddha butterfly camera cannon car_side ceiling_fan cellphone chair "
    "chandelier cougar_body cougar_face crab crayfish crocodile crocodile_head cup dalmatian dollar_bill dolphin "
    "dragonfly electric_guitar elephant emu euphonium ewer ferry flamingo flamingo_head garfield gerenuk gramophone "
    "grand_piano hawksbill headphone hedgehog helicopter ibis inline_skate joshua_tree kangaroo ketch lamp laptop "
    "llama lobster lotus mandolin mayfly menorah metronome minaret nautilus octopus okapi pagoda panda pigeon pizza "
    "platypus pyramid revolver rhino rooster saxophone schooner scissors scorpion sea_horse snoopy soccer_ball "
    "stapler starfish stegosaurus stop_sign strawberry sunflower tick trilobite umbrella watch water_lilly "
    "wheelchair wild_cat windsor_chair wrench yin_yang").split()
EUROSAT_FOLDERS = ("AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop Residential "
                   "River SeaLake").split()


def fake_tree(folder, classes, filename):
    """One small image per class folder, laid out as the downloaded dataset (so torchvision downloads nothing)."""
    for i, c in enumerate(classes):
        (folder / c).mkdir(parents=True)
        Image.new("RGB", (40, 40), (37 * i % 256, 90, 160)).save(folder / c / filename)


def test_caltech101_class_names_are_clips_readable_names(tmp_path):
    fake_tree(tmp_path / "caltech101" / "101_ObjectCategories", CALTECH101_FOLDERS, "image_0001.jpg")
    _, indices, names = evaluate.zero_shot_dataset("caltech101", str(tmp_path))
    names = list(names.values())
    assert (len(indices), len(names), names[:3], names[-1]) == (
        101, 101, ["off-center face", "centered face", "leopard"], "yin and yang symbol")


def test_caltech101_class_names_have_no_underscores(tmp_path):
    fake_tree(tmp_path / "caltech101" / "101_ObjectCategories", CALTECH101_FOLDERS, "image_0001.jpg")
    _, _, names = evaluate.zero_shot_dataset("caltech101", str(tmp_path))
    assert not [n for n in names.values() if "_" in n]


def test_caltech101_released_drops_faces_easy_and_prompts_with_the_folder_names(tmp_path):
    fake_tree(tmp_path / "caltech101" / "101_ObjectCategories", CALTECH101_FOLDERS, "image_0001.jpg")
    ds, indices, names = evaluate.zero_shot_dataset("caltech101", str(tmp_path), protocol="released")
    assert (len(names), len(indices)) == (100, 100) and "Faces_easy" not in names.values()
    assert {ds[i][1] for i in indices} == set(names)  # the images of the ranked classes, and only those
    assert [names[c] for c in sorted(names)][:3] == ["Faces", "Leopards", "Motorbikes"] and "car_side" in names.values()


def test_eurosat_zero_shot_reads_torchvision_layout_with_clips_names(tmp_path):
    fake_tree(tmp_path / "eurosat" / "2750", EUROSAT_FOLDERS, "a.jpg")
    model = clip_model.load(tiny_checkpoint(tmp_path))
    accs = evaluate.zero_shot_transfer(model, ["eurosat"], str(tmp_path), "{}", "cpu", workers=0)
    _, _, names = evaluate.zero_shot_dataset("eurosat", str(tmp_path))
    assert (set(accs), names[2]) == ({"eurosat"}, "brushland or shrubland")


@pytest.mark.parametrize("protocol, prompt", [("ours", "a bad photo of a brushland or shrubland."),
                                              ("released", "a bad photo of a HerbaceousVegetation.")])
def test_zero_shot_prompts_use_the_protocols_class_names(tmp_path, monkeypatch, protocol, prompt):
    fake_tree(tmp_path / "eurosat" / "2750", EUROSAT_FOLDERS, "a.jpg")
    model = clip_model.load(tiny_checkpoint(tmp_path))
    prompts, tokenize = [], clip_model.tokenize
    monkeypatch.setattr(clip_model, "tokenize", lambda texts, *args, **kw: prompts.extend(texts) or tokenize(texts,
                                                                                                   *args, **kw))
    evaluate.zero_shot_transfer(model, ["eurosat"], str(tmp_path), clip_model.PROMPT, "cpu", workers=0,
                                protocol=protocol)
    assert len(prompts) == 10 and prompt in prompts


@pytest.mark.parametrize("protocol, precision, expected", [
    ("ours", "bf16", [("centre", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), torch.bfloat16]),
    ("ours", "auto", [("centre", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), torch.float32]),  # auto: bf16 on CUDA only
    ("released", "fp32", [("squash", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), torch.float32])])
def test_zero_shot_normalizes_and_computes_as_the_protocol_and_precision_say(tmp_path, monkeypatch, protocol,
                                                                             precision, expected):
    fake_tree(tmp_path / "eurosat" / "2750", EUROSAT_FOLDERS, "a.jpg")
    model = clip_model.load(tiny_checkpoint(tmp_path))
    used, transform, encode = [], stream.eval_transform, model.encode_image
    monkeypatch.setattr(stream, "eval_transform", lambda images, image_size, resize, mean, std: used.append(
        (resize, tuple(mean), tuple(std))) or transform(images, image_size, resize, mean, std))
    monkeypatch.setattr(model, "encode_image", lambda images: used.append(encode(images).dtype) or encode(images))
    evaluate.zero_shot_transfer(model, ["eurosat"], str(tmp_path), "{}", "cpu", workers=0, mean=(0.5,) * 3,
                                std=(0.25,) * 3, protocol=protocol, precision=precision)
    assert used == expected  # one batch: its preprocessing, then its image features' dtype


def test_caltech101_is_read_without_scipy(tmp_path):
    # torchvision's Caltech101 imports scipy to read any item; scipy is in no requirements file
    fake_tree(tmp_path / "caltech101" / "101_ObjectCategories", CALTECH101_FOLDERS, "image_0001.jpg")
    code = ("import sys; sys.modules['scipy'] = None; import evaluate\n"
            f"for protocol in ('ours', 'released'):\n"
            f"    ds, indices, names = evaluate.zero_shot_dataset('caltech101', {str(tmp_path)!r}, protocol)\n"
            "    image, label = ds[indices[-1]]\n"
            "    print(protocol, len(indices), image.size, names[label])")
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=repository, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ours 101 (40, 40) yin and yang symbol",
                                          "released 100 (40, 40) yin_yang"]


@pytest.mark.parametrize("dataset", evaluate.ZERO_SHOT_DATASETS)
def test_a_failed_zero_shot_download_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch, dataset):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, _, err = run_cli(capsys, "zero-shot", "--model", tiny_checkpoint(tmp_path), "--act", "quickgelu",
                           "--datasets", dataset, "--data-root", tmp_path / "data", "--device", "cpu")
    assert (code, len(err.splitlines())) == (1, 1) and "no network" in err
    assert evaluate.ZERO_SHOT_SOURCES[dataset][0] in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv, value", [(["--batch-size", "0"], "got 0"), (["--datasets", "food101,mnist"], "mnist"),
                                         (["--protocol", "release"], "'release'")])
def test_a_refused_flag_is_one_line_naming_it_and_exit_2(tmp_path, capsys, argv, value):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["zero-shot", "--model", "ViT-B/16", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and argv[0] in err and value in err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["zero-shot", "--help"])
    out = capsys.readouterr().out
    assert "(default: 256)" in out and "(default: data)" in out and "(default: None)" not in out


def fake_pets(root):
    """Oxford-IIIT Pet as torchvision lays it out (two breeds, three trainval and one test image each) and CoOp's
    split file, which lists one trainval image of each breed for validation."""
    pets = root / "oxford-iiit-pet"
    (pets / "annotations").mkdir(parents=True)
    (pets / "images").mkdir()
    ids = {"trainval": [f"{b}_{i}" for b in ("Abyssinian", "american_bulldog") for i in (1, 2, 3)],
           "test": ["Abyssinian_4", "american_bulldog_4"]}
    for split, names in ids.items():
        (pets / "annotations" / f"{split}.txt").write_text(
            "".join(f"{n} {1 if n[0] == 'A' else 2} 1 1\n" for n in names))
        for n in names:
            Image.new("RGB", (40, 30), (200, 90, 20)).save(pets / "images" / f"{n}.jpg")
    val = [["Abyssinian_2.jpg", 0, "abyssinian"], ["american_bulldog_3.jpg", 1, "american_bulldog"]]
    (pets / "split_zhou_OxfordPets.json").write_text(json.dumps({"train": [], "val": val, "test": []}))


def test_oxford_pets_released_is_the_trainval_images_coops_split_validates_with_its_names(tmp_path):
    fake_pets(tmp_path)
    ds, indices, names = evaluate.zero_shot_dataset("oxford_pets", str(tmp_path), protocol="released")
    assert sorted(os.path.basename(ds._images[i]) for i in indices) == ["Abyssinian_2.jpg", "american_bulldog_3.jpg"]
    assert [ds[i][1] for i in indices] == [0, 1] and names == {0: "abyssinian", 1: "american_bulldog"}


def test_oxford_pets_ours_is_the_test_split_with_readable_names(tmp_path):
    fake_pets(tmp_path)
    ds, indices, names = evaluate.zero_shot_dataset("oxford_pets", str(tmp_path))
    assert (len(indices), names) == (2, {0: "Abyssinian", 1: "American Bulldog"})


def test_flowers102_released_names_come_from_coops_split_file(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets, "Flowers102", lambda root, split, download: [(None, 1), (None, 0)])
    (tmp_path / "flowers-102").mkdir()
    test = [["jpg/image_06734.jpg", 1, "hard-leaved pocket orchid"], ["jpg/image_06735.jpg", 0, "pink primrose"]]
    (tmp_path / "flowers-102" / "split_zhou_OxfordFlowers.json").write_text(json.dumps({"test": test}))
    _, _, names = evaluate.zero_shot_dataset("flowers102", str(tmp_path), protocol="released")
    assert names == {1: "hard-leaved pocket orchid", 0: "pink primrose"}


@pytest.mark.parametrize("dataset, path", [("oxford_pets", "oxford-iiit-pet/split_zhou_OxfordPets.json"),
                                           ("flowers102", "flowers-102/split_zhou_OxfordFlowers.json")])
def test_a_missing_coop_split_file_is_one_clear_line_before_any_download(tmp_path, capsys, dataset, path):
    code, _, err = run_cli(capsys, "zero-shot", "--model", tiny_checkpoint(tmp_path), "--act", "quickgelu",
                           "--datasets", dataset, "--protocol", "released", "--data-root", tmp_path / "data")
    assert (code, len(err.splitlines())) == (1, 1)
    assert str(tmp_path / "data" / path) in err and "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md" in err
    assert not (tmp_path / "data").exists()  # nothing was downloaded
    with pytest.raises(stream.DataError, match=os.path.basename(path)):  # train_online.py: before training
        evaluate.fetch_zero_shot([dataset], str(tmp_path / "data"), protocol="released")


def test_flowers102_names_are_clips_102_names(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets.Flowers102, "__init__", lambda self, root, split, download: setattr(
        self, "_image_files", ["a.jpg"]))  # torchvision's class names, no download
    _, _, names = evaluate.zero_shot_dataset("flowers102", str(tmp_path))
    assert len(set(names.values())) == 102
    assert (names[15], names[59], names[92]) == ("globe flower", "pink and yellow dahlia", "air plant")


def test_unknown_zero_shot_dataset_fails_before_any_work():
    with pytest.raises(stream.DataError, match="imagenet"):
        evaluate.zero_shot_transfer(None, ["food101", "imagenet"], "data", "{}", "cpu")


def test_unknown_zero_shot_protocol_fails_before_any_work(tmp_path):
    with pytest.raises(stream.DataError, match="'release'"):
        evaluate.fetch_zero_shot(["food101"], str(tmp_path), protocol="release")
    assert not os.listdir(tmp_path)  # nothing downloaded


def test_zero_shot_cli_writes_zero_shot_json(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    code, out, _ = run_cli(capsys, "zero-shot", "--model", tiny_checkpoint(tmp_path), "--datasets", "imagefolder",
                           "--data-root", root, "--device", "cpu", "--workers", 0, "--out", tmp_path / "zs")
    saved = json.loads((tmp_path / "zs" / "zero_shot.json").read_text())
    assert code == 0 and f"| imagefolder | {100 * saved['accuracy']['imagefolder']:.2f} |" in out


def save_peft(tmp_path, peft):
    """A tiny CLIP with LoRA/adapter weights moved off their zero start, saved as train_online.py saves peft.pt."""
    import adapter
    import lora
    checkpoint = tiny_checkpoint(tmp_path)
    model = clip_model.load(checkpoint, act="quickgelu")
    if peft == "lora":
        peft_args = {"r": 2, "alpha": 1.0, "targets": ("q", "v", "out")}
        lora.apply_lora(model, encoder="both", **peft_args)
    else:
        peft_args = {"bottleneck": 8, "scale": 0.1, "dropout": 0.1}
        adapter.apply_adapter(model, encoder="both", **peft_args)
    with torch.no_grad():  # so that a weight lost on the way would show
        for name, p in model.named_parameters():
            if peft in name:
                p.normal_(std=0.1)
    state_dict = lora.lora_state_dict(model) if peft == "lora" else adapter.adapter_state_dict(model)
    path = tmp_path / "run" / "peft.pt"
    path.parent.mkdir()
    torch.save({"model": checkpoint, "act": "quickgelu", "peft": peft, "encoder": "both", "peft_args": peft_args,
                "state_dict": state_dict, "prompt": "a photo of {}.", "dataset": "imagefolder",
                "class_names": ["a", "b"]}, path)
    return model.eval(), path


@pytest.mark.parametrize("peft", ["lora", "adapter"])
def test_load_peft_model_rebuilds_the_tuned_model(tmp_path, peft):
    model, path = save_peft(tmp_path, peft)
    rebuilt, _ = evaluate.load_peft_model(str(path))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(clip_model.class_text_features(rebuilt, ["cat"]),
                                   clip_model.class_text_features(model, ["cat"]))


def test_load_peft_model_returns_the_runs_prompt(tmp_path):
    _, path = save_peft(tmp_path, "lora")
    assert evaluate.load_peft_model(str(path))[1] == "a photo of {}."


def test_zero_shot_cli_writes_zero_shot_json_next_to_the_weights(tmp_path, capsys):
    _, path = save_peft(tmp_path, "lora")
    root = image_folder(tmp_path / "images")
    code, _, _ = run_cli(capsys, "zero-shot", "--peft-weights", path, "--datasets", "imagefolder",
                         "--data-root", root, "--device", "cpu", "--workers", 0)
    assert code == 0 and json.loads((path.parent / "zero_shot.json").read_text())["prompt"] == "a photo of {}."


def test_zero_shot_cli_follows_the_protocol_peft_pt_recorded_unless_told_otherwise(tmp_path, capsys):
    _, path = save_peft(tmp_path, "lora")
    saved = torch.load(path, weights_only=True)
    saved["recipe"] = {"zero_shot_protocol": "released", "precision": "fp32"}
    torch.save(saved, path)
    root = image_folder(tmp_path / "images")
    for extra, protocol in (((), "released"), (("--protocol", "ours"), "ours")):
        code, _, _ = run_cli(capsys, "zero-shot", "--peft-weights", path, "--datasets", "imagefolder",
                             "--data-root", root, "--device", "cpu", "--workers", 0, *extra)
        assert code == 0 and json.loads((path.parent / "zero_shot.json").read_text())["protocol"] == protocol


def test_peft_weights_that_do_not_fit_their_settings_are_one_clear_line(tmp_path, capsys):
    _, path = save_peft(tmp_path, "lora")
    saved = torch.load(path, weights_only=True)
    saved["peft_args"]["r"] = 3  # the saved tensors have rank 2
    torch.save(saved, path)
    code, _, err = run_cli(capsys, "zero-shot", "--peft-weights", path, "--datasets", "imagefolder")
    assert (code, len(err.splitlines())) == (1, 1) and str(path) in err


def test_a_peft_file_written_before_centre_was_named_so_still_evaluates(tmp_path, capsys):
    _, path = save_peft(tmp_path, "lora")
    saved = torch.load(path, weights_only=True)
    saved["test_resize"] = "clip"  # OpenAI's centre fit, under its old name
    torch.save(saved, path)
    code, _, err = run_cli(capsys, "zero-shot", "--peft-weights", path, "--datasets", "imagefolder",
                           "--data-root", image_folder(tmp_path / "images"), "--device", "cpu", "--workers", 0)
    assert code == 0, err


@pytest.mark.parametrize("content", [None, b"not a torch file", "wrong dict"])
def test_missing_or_corrupt_peft_file_is_one_clear_line(tmp_path, capsys, content):
    path = tmp_path / "peft.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "wrong dict":
        torch.save({"model": "ViT-B/16"}, path)
    code, out, err = run_cli(capsys, "zero-shot", "--peft-weights", path, "--datasets", "imagefolder")
    assert (code, len(err.splitlines())) == (1, 1) and str(path) in err


def test_cuda_without_a_gpu_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(capsys, "zero-shot", "--model", "ViT-B/16", "--datasets", "imagefolder", "--device", "cuda")
    assert (code, len(err.splitlines())) == (1, 1) and "no CUDA GPU" in err and "Traceback" not in err
