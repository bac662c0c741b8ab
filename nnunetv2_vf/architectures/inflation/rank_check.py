"""Does a module work on ``[B, C, D, H, W]`` as it does on ``[B, C, H, W]``?  Decided from what it does.

A module is rank-agnostic when its own parameters are at most 2D (channel vectors, linear weights: nothing laid out
on the image grid) and its ``forward`` (with the methods it calls on ``self``/``super()``) only chains children and
operations that do not address spatial axes by position.  Children are checked on their own by the rewriter.
Refused, naming the operation and its source line:

* functions/methods whose name ends in ``2d`` (``F.avg_pool2d``, ``adaptive_avgmax_pool2d``, ``F.conv2d``);
* operations that lay out axes by position or count: ``permute``, ``view``/``reshape`` (except ``(batch, -1)``),
  ``transpose``, ``movedim``, ``unflatten``, ``expand``/``repeat``, ``roll``, ``flip``, ``F.pad``/``pad_same``,
  ``interpolate``, ``pixel_shuffle``, ``unfold``/``fold``, ``einsum``, ``rearrange``;
* reductions, softmax, concatenation, splitting, squeezing and indexing along an axis other than batch/channel
  (``x.mean((2, 3))``, ``softmax(x, -1)``, ``x.squeeze(-1)``), or along an axis the source computes at run time;
  ``flatten(start)`` with ``start <= 2`` and no end (it merges all trailing axes) is fine;
* spatial sizes read by position: ``B, C, H, W = x.shape``, ``x.shape[2]``, ``x.shape[-2:]``, ``x.size(-1)``.

This is a static reading of Python source: it cannot see into C++ operators or functions the forward calls by
name (``drop_path(x)``), which it trusts unless their name matches the rules above.  What it accepts is what the
depth-constant equivalence test runs (tests/test_inflate.py, 15+ timm families).
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from functools import lru_cache

from torch import nn

__all__ = ["rank_problems", "module_problems"]

_PINNED = {"permute", "view", "reshape", "unflatten", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims",
           "unfold", "fold", "roll", "flip", "rot90", "pad", "pad_same", "interpolate", "upsample",
           "upsample_bilinear", "upsample_nearest", "grid_sample", "affine_grid", "pixel_shuffle", "pixel_unshuffle",
           "rearrange", "einsum", "expand", "repeat", "tile", "view_as_windows", "as_strided"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "nansum", "nanmean",
               "argmax", "argmin", "median", "all", "any", "max", "min", "std_mean", "var_mean"}
_NEEDS_DIM = {"softmax", "log_softmax", "softmin", "cumsum", "cumprod"}
_ALONG = {"cat", "concat", "concatenate", "stack", "split", "chunk", "tensor_split", "unbind", "narrow", "select",
          "index_select", "gather", "squeeze", "unsqueeze", "flatten", "normalize"}  # normalize: dim 1 default
# position of the axis argument for a tensor method (x.op(...)) / a function taking the tensor first (torch.op(x, ...))
_DIM_POSITION = {"split": 1, "chunk": 1, "tensor_split": 1, "normalize": 1}
_NAMESPACES = {"torch", "F", "nn", "functional", "fn"}
_OK_AXES = {0, 1}  # batch, channel


def _name(func: ast.AST) -> str:
    return func.attr if isinstance(func, ast.Attribute) else (func.id if isinstance(func, ast.Name) else "")


def _is_self_attr(func: ast.AST) -> bool:
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self"


def _is_super_attr(func: ast.AST) -> bool:
    return (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)
            and isinstance(func.value.func, ast.Name) and func.value.func.id == "super")


def _literal(node: ast.AST):
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in value):
        return tuple(value)
    return None


def _axis_args(call: ast.Call, name: str) -> list[ast.AST]:
    keywords = [k.value for k in call.keywords if k.arg in ("dim", "dims", "axis", "start_dim", "end_dim")]
    if keywords:
        return keywords
    function_style = isinstance(call.func, ast.Name) or (
        isinstance(call.func, ast.Attribute) and _name(call.func.value) in _NAMESPACES)
    position = _DIM_POSITION.get(name, 0) + (1 if function_style else 0)
    if name in ("cat", "concat", "concatenate", "stack"):
        position = 1  # torch.cat(tensors, dim)
    if name == "flatten":
        return list(call.args[position:position + 2])
    return list(call.args[position:position + 1])


def _call_problem(call: ast.Call) -> str | None:
    name = _name(call.func)
    lowered = name.lower()
    if lowered.endswith("2d") or lowered.endswith("_2d"):
        return "a 2D operator"
    if name in ("view", "reshape") and len(call.args) == 2 and _literal(call.args[1]) == (-1,):
        return None  # (batch, -1): flattens whatever the rank
    if name in _PINNED:
        return "lays out axes by position"
    if name == "size" and call.args:
        axes = _literal(call.args[0])
        if axes is None or any(a >= 2 or a < 0 for a in axes):
            return "reads a spatial size by position"
        return None
    if name not in _REDUCTIONS | _NEEDS_DIM | _ALONG:
        return None
    args = _axis_args(call, name)
    if not args:
        return "works along an implicit axis" if name in _NEEDS_DIM else None
    if name in ("max", "min") and not call.keywords and _literal(args[0]) is None:
        return None  # torch.max(a, b): elementwise
    axes = [_literal(a) for a in args]
    if any(a is None for a in axes):
        return "works along an axis computed at run time"
    flat = [v for a in axes for v in a]
    if name == "flatten":
        start, end = (flat + [-1])[:2]
        return None if 0 <= start <= 2 and end == -1 else "lays out axes by position"
    if any(v not in _OK_AXES for v in flat):
        return f"works along axis {flat if len(flat) > 1 else flat[0]} (a spatial axis)"
    return None


def _shape_problems(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Attribute, ast.Call)):
            src = node.value.func if isinstance(node.value, ast.Call) else node.value
            if _name(src) in ("shape", "size") and any(isinstance(t, ast.Tuple) and len(t.elts) == 4
                                                       for t in node.targets):
                found.append((node, "unpacks a 4D shape"))
        if isinstance(node, ast.Subscript) and _name(node.value) == "shape":
            index = node.slice
            if isinstance(index, ast.Slice):  # shape[2:] (all spatial sizes) and shape[:2] are rank-agnostic
                start = _literal(index.lower) if index.lower is not None else (0,)
                stop = _literal(index.upper) if index.upper is not None else (None,)
                bad = (start is None or not 0 <= start[0] <= 2 or stop is None
                       or (stop[0] is not None and not 0 <= stop[0] <= 2))
            else:
                axes = _literal(index)
                bad = axes is None or axes[0] >= 2 or axes[0] < 0
            if bad:
                found.append((node, "reads a spatial size by position"))
    return found


def _owner(cls: type, attr: str, after: type | None = None) -> tuple[type, object] | None:
    mro = cls.__mro__
    if after is not None and after in mro:
        mro = mro[mro.index(after) + 1:]
    for klass in mro:
        if attr in vars(klass):
            return klass, vars(klass)[attr]
    return None


def _function_problems(cls: type, owner: type, fn, seen: set) -> list[str]:
    key = (owner, getattr(fn, "__qualname__", repr(fn)))
    if key in seen:
        return []
    seen.add(key)
    fn = inspect.unwrap(fn)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        first_line = inspect.getsourcelines(fn)[1]
        file = inspect.getsourcefile(fn) or "?"
    except (OSError, TypeError):
        return [f"{owner.__qualname__}.{getattr(fn, '__name__', '?')} has no Python source to check"]
    tree = ast.parse(source)
    short = "/".join(file.split("/")[-2:])
    problems = []

    def report(node: ast.AST, why: str) -> None:
        problems.append(f"`{ast.unparse(node)[:90]}` {why} ({short}:{first_line + node.lineno - 1})")

    for node, why in _shape_problems(tree):
        report(node, why)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if _is_self_attr(node.func) or _is_super_attr(node.func):
            # self.child(x) is checked as a child; self.method(x) / super().method(x) are read here
            # (torch.nn.Module's own helpers, self.items() etc., are not read; a torch parent's forward is)
            is_super = _is_super_attr(node.func)
            found = _owner(cls, node.func.attr, owner if is_super else None)
            if found is not None and inspect.isfunction(found[1]) and (
                    is_super or not found[0].__module__.startswith("torch.")):
                problems += _function_problems(cls, found[0], found[1], seen)
            continue
        why = _call_problem(node)
        if why:
            report(node, why)
    return problems


@lru_cache(maxsize=None)
def rank_problems(cls: type) -> tuple[str, ...]:
    """Why ``cls.forward`` would act on the wrong axes of a 5D tensor (empty: rank-agnostic)."""
    found = _owner(cls, "forward")
    if found is None:
        return ()
    owner, fn = found
    if not inspect.isfunction(fn):
        return (f"{cls.__qualname__}.forward is not a Python function",)
    return tuple(dict.fromkeys(_function_problems(cls, owner, fn, set())))


def module_problems(m: nn.Module) -> list[str]:
    """:func:`rank_problems` plus the module's own parameters/buffers laid out on the image grid (3+ dims)."""
    own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
    problems = [f"its own tensor {name!r} {tuple(t.shape)} has 3+ axes (laid out on the image grid or token "
                f"sequence, or a kernel only a replaced conv layer may own)"
                for name, t in own if t is not None and t.ndim >= 3]
    if isinstance(m, nn.Flatten):
        return problems if m.end_dim == -1 else problems + ["nn.Flatten with an end_dim lays out axes by position"]
    return problems + list(rank_problems(type(m)))
