"""The plugin lives beside nnU-Net, never inside it: no source file of the package assigns to an attribute of an
nnunetv2 module/class (``run_training.load_pretrained_weights = ...``), calls ``setattr`` on one, replaces an entry
of ``sys.modules`` for nnunetv2 or patches an ``"nnunetv2..."`` path; and no trainer reads ``sys.argv``."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nnunetv2_vf"


def _nnunet_names(tree: ast.AST) -> set[str]:
    """Local names bound to nnunetv2 modules or objects by any import in the file (function-level ones too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "nnunetv2" or a.name.startswith("nnunetv2."):
                    names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nnunetv2":
            names.update(a.asname or a.name for a in node.names)
    return names


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_nnunet_module_call(node: ast.AST) -> bool:
    """``importlib.import_module("nnunetv2...")`` / ``sys.modules["nnunetv2..."]``."""
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        return str(node.args[0].value).startswith("nnunetv2")
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return str(node.slice.value).startswith("nnunetv2")
    return False


def violations(source: str, filename: str = "<string>") -> list[str]:
    tree = ast.parse(source, filename)
    bound = _nnunet_names(tree)
    found = []
    # a script's own ``if __name__ == "__main__": main(sys.argv[1:])`` is not a trainer reading the command line
    main_guard = {id(n) for top in tree.body if isinstance(top, ast.If) and "__main__" in ast.unparse(top.test)
                  for n in ast.walk(top)}

    def targets_nnunet(target: ast.AST) -> bool:
        if isinstance(target, ast.Attribute):
            return _root(target) in bound or _is_nnunet_module_call(target.value)
        if isinstance(target, ast.Subscript):  # sys.modules["nnunetv2.x"] = ...
            return _is_nnunet_module_call(target)
        return False

    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                for sub in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]):
                    if targets_nnunet(sub):
                        found.append(f"{where}: assignment to {ast.unparse(sub)}")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func in ("setattr", "delattr", "builtins.setattr") and node.args:
                obj = node.args[0]
                if (isinstance(obj, ast.Name) and obj.id in bound) or _root(obj) in bound \
                        or _is_nnunet_module_call(obj):
                    found.append(f"{where}: {func}({ast.unparse(obj)}, ...)")
            if func.split(".")[-1] in ("patch", "setattr", "object") and node.args and \
                    isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("nnunetv2"):
                found.append(f"{where}: {func}({node.args[0].value!r}, ...)")
        elif isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.argv" and id(node) not in main_guard:
            found.append(f"{where}: reads sys.argv")
    return found


def test_checker_catches_the_old_interception():
    old_hook = ("def hook(trainer):\n    import nnunetv2.run.run_training as run_training\n"
                "    run_training.load_pretrained_weights = lambda *a: None\n")
    assert violations(old_hook)
    assert violations("import nnunetv2\nnnunetv2.run.run_training.load_pretrained_weights = None\n")
    assert violations("from nnunetv2.run import run_training\nsetattr(run_training, 'x', 1)\n")
    assert violations("from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
                      "nnUNetTrainer.initialize = None\n")
    assert violations("import importlib\nsetattr(importlib.import_module('nnunetv2.run.run_training'), 'x', 1)\n")
    assert violations("import sys\nsys.modules['nnunetv2.run.run_training'] = None\n")
    assert violations("from unittest import mock\nmock.patch('nnunetv2.run.run_training.x', 1)\n")
    assert violations("import sys\ndef f():\n    return sys.argv[1:]\n")
    assert not violations("import sys\nif __name__ == '__main__':\n    main(sys.argv[1:])\n")
    # subclassing and instance attributes are fine
    assert not violations("from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
                          "class T(nnUNetTrainer):\n    def __init__(self):\n        self.num_epochs = 2\n")


def test_package_never_reassigns_nnunetv2_attributes_nor_reads_argv():
    """Nothing patches nnU-Net; ``sys.argv`` is read only by a script's own ``__main__`` block (trainers must work
    the same when training is started from Python, ``nnunetv2.run.run_training.run_training(...)``)."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert not found, "nnU-Net must be extended, not patched:\n" + "\n".join(found)
