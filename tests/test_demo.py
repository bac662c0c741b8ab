"""The demo: keeps an existing output folder, prints real copy-pasteable commands with their environment, numbers
its steps truthfully, hides nnU-Net's per-tensor listing, and ends report.md with the same commands as a recipe."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from nnunetv2_vf import demo
from nnunetv2_vf.workflow import console_script, run_nnunet

ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
DEMO_VARIABLES = {"nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_compile",
                  "nnUNet_extTrainer"}


def _shell_lines(text: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in text.splitlines() if line.startswith("$ ")]


def _split_assignments(tokens: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while tokens and ASSIGNMENT.match(tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    return env, tokens


def test_existing_output_folder_is_kept_without_overwrite(tmp_path, capsys):
    out = tmp_path / "demo_out"
    (out / "nnUNet_raw").mkdir(parents=True)
    keep = out / "report.md"
    keep.write_text("an earlier result")
    assert demo.main(["-o", str(out), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "-o DIR" in err
    assert keep.read_text() == "an earlier result"


def test_overwrite_refuses_a_folder_that_is_not_a_demo_output(tmp_path, capsys):
    out = tmp_path / "my_thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    assert demo.main(["-o", str(out), "--overwrite"]) == 2
    assert "does not look like a demo output folder" in capsys.readouterr().err
    assert (out / "chapter1.tex").read_text() == "precious"
    # an earlier demo's folder may be replaced; an empty or missing one needs no flag
    (out / "report.md").write_text("old")
    assert demo._check_output_folder(out, overwrite=True) is None
    assert demo._check_output_folder(tmp_path / "new", overwrite=False) is None


@pytest.mark.parametrize("flags", [[], ["--quick"], ["--no-pretraining"]])
def test_printed_commands_are_valid_and_steps_numbered(tmp_path, capsys, flags):
    out = tmp_path / "d"
    assert demo.main(["-o", str(out), "--dry-run", *flags]) == 0
    assert not out.exists()  # --dry-run creates nothing
    text = capsys.readouterr().out

    steps = [(int(i), int(n)) for i, n in re.findall(r"^=== step (\d+)/(\d+): ", text, re.M)]
    n = 5 if "--no-pretraining" in flags else 9
    assert steps == [(i, n) for i in range(1, n + 1)]
    assert re.search(rf"^nnunetv2-vf demo.*: {n} steps, about [\d.]+ (min|s) on a quiet 2-core CPU", text, re.M)

    lines = _shell_lines(text)
    assert lines[0][0] == "export"
    exported, rest = _split_assignments(lines[0][1:])
    assert not rest and DEMO_VARIABLES <= set(exported)
    assert exported["nnUNet_raw"] == str(out / "nnUNet_raw") and exported["nnUNet_compile"] == "f"
    commands = []
    for tokens in lines[1:]:
        extra, argv = _split_assignments(tokens)
        assert set(extra) <= DEMO_VARIABLES, extra
        if argv[0] == "cp":
            assert argv[1:] == ["-r", str(demo.DEMO_DATA), str(out / "nnUNet_raw" / demo.DATASET_NAME)]
            continue
        assert Path(console_script(argv[0])).is_file(), argv[0]  # an installed console script
        commands.append(argv)
    names = [c[0] for c in commands]
    assert names.count("nnUNetv2_train") == names.count("nnUNetv2_predict") == (1 if "--no-pretraining" in flags
                                                                                 else 2)
    if "--no-pretraining" not in flags:
        pretrain = next(c for c in commands if c[0] == "nnUNetv2_vf_pretrain")
        assert pretrain[pretrain.index("--modality") + 1] == "MR"
        finetune = next(c for c in commands if c[0] == "nnUNetv2_train" and "-pretrained_weights" in c)
        assert finetune[finetune.index("-p") + 1] == "nnUNetPlans_VF"
        assert finetune[finetune.index("-pretrained_weights") + 1] == str(out / "vf_pretraining" /
                                                                          "checkpoint_final.pth")
        assert any(c[0] == "nnUNetv2_vf_adapt_plans" for c in commands)
    suffix = ("_2epochs" if "--quick" in flags else "_10epochs") + "_seed0"  # seeded arms: same batches
    assert all(c[c.index("-tr") + 1].endswith(suffix) for c in commands if c[0] == "nnUNetv2_train")


def test_real_run_prints_the_command_and_environment_it_starts(tmp_path, capsys):
    """run_nnunet's on_start callback: the demo prints what really runs (here a cheap plugin console script)."""
    args = argparse.Namespace(output=str(tmp_path / "d"), dry_run=False, quick=True, no_pretraining=False,
                              device="cpu", verbose=False)
    d = demo.Demo(args)
    output = run_nnunet(["nnUNetv2_vf_trainer_dir"], d.env, echo=False, on_start=d.announce)
    printed = capsys.readouterr().out
    assert printed == "$ nnUNetv2_vf_trainer_dir\n" and d.recipe[-1] == "nnUNetv2_vf_trainer_dir"
    assert output.strip() == demo.TRAINER_DIR
    # the planner gets nnUNet_n_proc_DA=1 from run_nnunet: the printed line says so
    d.announce(["nnUNetv2_plan_and_preprocess", "-d", "4"], dict(d.env, nnUNet_n_proc_DA="1"))
    assert capsys.readouterr().out == "$ nnUNet_n_proc_DA=1 nnUNetv2_plan_and_preprocess -d 4\n"


def test_report_ends_with_the_commands_as_a_recipe(tmp_path, capsys):
    assert demo.main(["-o", str(tmp_path / "d"), "--dry-run"]) == 0
    printed = [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    args = argparse.Namespace(output=str(tmp_path / "d"), dry_run=True, quick=False, no_pretraining=False,
                              device="cpu", verbose=False)
    d = demo.Demo(args)
    d.run()
    capsys.readouterr()
    d.results = {"scratch": {"Anterior": 0.8, "Posterior": 0.7}, "vf_pretrained": {"Anterior": 0.81,
                                                                                    "Posterior": 0.72}}
    d.validation, d.n_pictures = {"scratch": 0.74}, 16
    report = d.report(600.0)
    assert report.rstrip().endswith("```")
    recipe = report[report.index("## Recipe"):]
    block = recipe[recipe.index("```bash\n") + len("```bash\n"): recipe.rindex("```")]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert commands == printed
    assert "| scratch | `PCTNetTrainer_small_10epochs_seed0` | 0.800 | 0.700 | 0.750 | 0.740 |" in report
    assert "What this can and cannot show" in report and "docs/evidence.md" in report
    assert "7 cases of fold 0" in report and "25 training cases" in report


def test_console_hides_nnunets_per_tensor_listing_unless_verbose(tmp_path):
    lines = ["2026-11-26 epoch 0\n", "########## Loading pretrained weights from file x.pth ##########\n",
             demo.NNUNET_LISTING_START + ":\n", "encoder.0.weight shape torch.Size([8, 1, 3, 3, 3])\n",
             "encoder.0.bias shape torch.Size([8])\n", demo.NNUNET_LISTING_END + "\n", "Epoch 1\n"]
    quiet = demo.ConsoleFilter(verbose=False, log_file=tmp_path / "step07_train.log")
    shown = [s for s in map(quiet, lines) if s]
    assert shown[:2] == lines[:2] and shown[-1] == "Epoch 1\n" and len(shown) == 4
    assert "listed the 2 pretrained tensors" in shown[2] and "step07_train.log" in shown[2] and "--verbose" in shown[2]
    loud = demo.ConsoleFilter(verbose=True, log_file=tmp_path / "x.log")
    assert [loud(line) for line in lines] == lines


def test_console_thins_out_progress_bar_redraws(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(demo, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    quiet = demo.ConsoleFilter(verbose=False, log_file=tmp_path / "x.log")

    def bar(n, t):
        clock[0] = t
        return quiet(f"VF pretraining:  {5 * n}%|▌         | {n}/20 [00:{t:02.0f}<04:57, 15.67s/it, loss=1.4764]\n")

    shown = [n for n, t in [(0, 0), (1, 10), (1, 11), (2, 29), (3, 31), (4, 40), (20, 45), (20, 45)] if bar(n, t)]
    assert shown == [0, 3, 20]  # the first, one per 30 s, the finished one once
    assert quiet("2026-11-26 02:32:17: iteration 10/20: train loss 1.4139\n")  # other lines pass


def test_console_shows_a_repeated_warning_once(tmp_path):
    seen = set()
    warning = ["/x/torch/jit/_script.py:1643: FutureWarning: `torch.jit.interface` is deprecated.\n",
               "  warnings.warn(\n"]
    first = demo.ConsoleFilter(False, tmp_path / "a.log", seen_warnings=seen)
    assert [first(line) for line in [*warning, "Epoch 0\n"]] == [*warning, "Epoch 0\n"]
    second = demo.ConsoleFilter(False, tmp_path / "b.log", seen_warnings=seen)  # the next command
    assert [second(line) for line in [*warning, "Epoch 0\n"]] == [None, None, "Epoch 0\n"]


def test_estimates_come_from_the_step_time_table(tmp_path, monkeypatch):
    """The demo's printed estimates are the table that benchmarks/demo_step_times.py regenerates, not constants."""
    import json
    table = json.loads(demo.STEP_TIMES.read_text())
    assert set(table["default"]) == set(table["quick"]) >= {"plan", "pretrain", "train", "predict"}
    table["default"] = {k: 60.0 for k in table["default"]}
    alt = tmp_path / "step_times.json"
    alt.write_text(json.dumps(table))
    monkeypatch.setattr(demo, "STEP_TIMES", alt)
    monkeypatch.setattr(demo.step_time_estimates, "__defaults__", (alt,))
    args = argparse.Namespace(output=str(tmp_path / "d"), dry_run=True, quick=False, no_pretraining=False,
                              device="cpu", verbose=False)
    d = demo.Demo(args)
    assert [d.estimate_s(s) for s in d.steps] == [60.0] * len(d.steps)


def test_a_step_slower_than_its_estimate_says_so_while_it_runs(capsys, monkeypatch):
    import time
    assert demo.slower_than_estimated("step 3", 100, 100, finished=True) is None
    line = demo.slower_than_estimated("step 3", 684, 174, finished=True)
    assert "slower than estimated: step 3 took 11.4 min, 3.9x the 2.9 min" in line and "load average" in line
    monkeypatch.setattr(demo, "SLOW_MARGIN_S", 0)
    with demo.SlowStepWatch("step 2", estimate_s=0.05, poll_s=0.02) as watch:
        time.sleep(0.5)
    out = capsys.readouterr().out
    assert watch.reported and out.count("slower than estimated: step 2 has run for") == 1, out
    assert "still running" in out
    with demo.SlowStepWatch("step 4", estimate_s=60, poll_s=0.02) as watch:  # within the estimate: silent
        time.sleep(0.1)
    assert not watch.reported and capsys.readouterr().out == ""
