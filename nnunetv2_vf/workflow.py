"""Helpers that drive nnU-Net's own console scripts: used by the demo, the benchmarks and the tests.

Everything here shells out to the real ``nnUNetv2_*`` entry points, exactly as a user would type them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

from nnunetv2_vf.nnunet_ext_trainers import with_trainer_dir


def nnunet_environment(root: str | os.PathLike, n_proc: int = 1, extra: dict | None = None) -> dict:
    """Environment for nnU-Net subprocesses with raw/preprocessed/results under ``root``.

    Small-machine settings: one export worker, in-process augmentation, no torch.compile, and the plugin's trainer
    folder on ``nnUNet_extTrainer``.
    """
    root = Path(root)
    env = with_trainer_dir()
    for name, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                      ("nnUNet_results", "nnUNet_results")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / sub)
    env.setdefault("nnUNet_def_n_proc", str(n_proc))
    env.setdefault("nnUNet_n_proc_DA", "0")
    env.setdefault("nnUNet_compile", "f")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def console_script(name: str) -> str:
    """Absolute path of an installed console script, next to the running interpreter if possible."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"console script {name!r} not found: is nnunetv2 (and this plugin) installed in "
                                f"the active environment?")
    return found


def _entry_point(name: str) -> str | None:
    """``module:function`` of a console script, from installed metadata or this checkout's pyproject.toml."""
    from importlib.metadata import entry_points
    for ep in entry_points(group="console_scripts"):
        if ep.name == name:
            return ep.value
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib
        return tomllib.loads(pyproject.read_text())["project"]["scripts"].get(name)
    return None


def command_line(name: str) -> list[str]:
    """How to start a console script: its installed executable, or, where only the packages are importable (an
    offline machine with wheels unpacked onto PYTHONPATH, a checkout that is not pip-installed), this interpreter
    running the script's entry point."""
    try:
        return [console_script(name)]
    except FileNotFoundError:
        target = _entry_point(name)
        if target is None:
            raise
    module, function = target.split(":")
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {function} as main; "
                                  f"sys.exit(main())"]


def command_environment(args: Sequence[str], env: dict) -> dict:
    """The environment :func:`run_nnunet` really gives the command ``args`` (``env`` itself unless noted)."""
    if "plan" in str(args[0]) and env.get("nnUNet_n_proc_DA") == "0":
        # nnU-Net 2.8.1's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0
        return dict(env, nnUNet_n_proc_DA="1")
    return env


def run_nnunet(args: Sequence[str], env: dict, log_file: str | os.PathLike | None = None,
               timeout: float | None = None, echo: Union[bool, Callable[[str], Union[str, None]]] = True,
               on_start: Callable[[list, dict], None] | None = None) -> str:
    """Run ``args`` (first element a console-script name) and return its combined output.

    Output is streamed to the terminal (``echo``) and to ``log_file``; a non-zero exit raises RuntimeError that
    carries the last lines of output, so a failing step says why.  ``echo`` may be a callable that gets each output
    line and returns what to show (``None``/``""``: nothing); the returned output and ``log_file`` stay complete.
    ``on_start(args, env)`` is called just before the process starts, with the console-script name, the arguments
    as strings and the environment it really gets (e.g. to print a copy-pasteable command).
    """
    cmd = [*command_line(str(args[0])), *map(str, args[1:])]
    env = command_environment(args, env)
    if on_start is not None:
        on_start([str(args[0]), *map(str, args[1:])], env)
    start = time.time()
    lines: list[str] = []
    log = open(log_file, "a") if log_file else None
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            shown = echo(line) if callable(echo) else (line if echo else None)
            if shown:
                sys.stdout.write(shown)
                sys.stdout.flush()
            if log:
                log.write(line)
            if timeout is not None and time.time() - start > timeout:
                proc.kill()
                raise TimeoutError(f"{' '.join(cmd)} ran past {timeout} s")
        proc.wait()
    finally:
        if log:
            log.close()
    out = "".join(lines)
    if proc.returncode != 0:
        tail = "".join(lines[-60:])
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n--- last output ---\n"
                           f"{tail}")
    return out


def make_subset_dataset(source: str | os.PathLike, raw_root: str | os.PathLike, dataset_id: int, name: str,
                        case_ids: Iterable[str] | int) -> Path:
    """Copy some cases of an nnU-Net raw dataset into ``raw_root/DatasetXXX_name`` (images, labels, dataset.json).

    ``case_ids``: explicit identifiers, or a number N meaning the first N cases in sorted order.
    """
    source = Path(source)
    with open(source / "dataset.json") as f:
        dataset_json = json.load(f)
    ending = dataset_json["file_ending"]
    all_ids = sorted(p.name[: -len(ending)] for p in (source / "labelsTr").iterdir() if p.name.endswith(ending))
    ids = all_ids[:case_ids] if isinstance(case_ids, int) else list(case_ids)
    target = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    (target / "imagesTr").mkdir(parents=True, exist_ok=True)
    (target / "labelsTr").mkdir(parents=True, exist_ok=True)
    n_channels = len(dataset_json["channel_names"])
    for cid in ids:
        for c in range(n_channels):
            shutil.copy2(source / "imagesTr" / f"{cid}_{c:04d}{ending}", target / "imagesTr")
        shutil.copy2(source / "labelsTr" / f"{cid}{ending}", target / "labelsTr")
    dataset_json = dict(dataset_json, numTraining=len(ids), name=name)
    with open(target / "dataset.json", "w") as f:
        json.dump(dataset_json, f, indent=2)
    return target
