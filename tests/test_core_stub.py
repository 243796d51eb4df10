"""The boundary of the extension module hiquant._core.

python/hiquant/_core.pyi describes the built extension: the same public names, and for every
function, method and constructor the parameter names (and which have defaults) that pybind11
reports. A binding added, removed or renamed without its stub fails here. And every argument
check of the bindings raises a class of hiquant.errors (one translator in module.cpp)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import hiquant
from hiquant import _core

STUB = Path(hiquant.__file__).with_name("_core.pyi")


# ------------------------------------------------------------------------------- the stub side
def _is_overload(fn: ast.FunctionDef) -> bool:
    return any(getattr(d, "id", getattr(d, "attr", "")) == "overload" for d in fn.decorator_list)


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, bool]]:
    """(name, has a default) for each parameter, in order."""
    a = fn.args
    positional = a.posonlyargs + a.args
    n_plain = len(positional) - len(a.defaults)
    params = [(p.arg, i >= n_plain) for i, p in enumerate(positional)]
    if a.vararg:
        params.append(("*" + a.vararg.arg, False))
    params += [(p.arg, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        params.append(("**" + a.kwarg.arg, False))
    return params


def _stub_scope(body) -> dict:
    """name -> ("function", [signatures]) | ("property", settable) | ("class", members)
    | ("attr",)."""
    out: dict = {}
    for node in body:
        if isinstance(node, ast.FunctionDef):
            decorators = {d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", "")
                          for d in node.decorator_list}
            if "property" in decorators:
                out[node.name] = ("property", False)
            elif "setter" in decorators:
                out[node.name] = ("property", True)
            else:
                sigs = out.get(node.name, ("function", []))[1] if _is_overload(node) else []
                out[node.name] = ("function", sigs + [_stub_params(node)])
        elif isinstance(node, ast.ClassDef):
            out[node.name] = ("class", _stub_scope(node.body))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = ("attr",)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = ("attr",)
    return out


@pytest.fixture(scope="module")
def stub() -> dict:
    assert STUB.is_file(), f"{STUB} is missing; it ships beside the package's __init__.py"
    return _stub_scope(ast.parse(STUB.read_text(encoding="utf-8")).body)


# -------------------------------------------------------------------------------- the module side
def _split_top_level(s: str) -> list[str]:
    """Split at commas outside brackets and string literals."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in s:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def _parse_signature(line: str, name: str) -> list[tuple[str, bool]]:
    """(name, has a default) from pybind's 'name(a: T, b: T = 0) -> R' (or a text signature)."""
    line = line.strip()
    assert line.startswith(name + "("), f"unexpected signature line for {name}: {line!r}"
    depth = 0
    for end, ch in enumerate(line):
        depth += ch == "("
        depth -= ch == ")"
        if ch == ")" and depth == 0:
            break
    params = []
    for part in _split_top_level(line[len(name) + 1:end]):
        part = part.strip()
        if part in ("/", "*", "$self"):
            continue
        head = part.split("=", 1)[0].split(":", 1)[0].strip()
        params.append((head.lstrip("$"), "=" in part))
    return params


def _runtime_signatures(obj, name: str) -> list[list[tuple[str, bool]]]:
    text_sig = getattr(obj, "__text_signature__", None)
    if text_sig:
        return [_parse_signature(name + text_sig, name)]
    doc = obj.__doc__ or ""
    lines = doc.splitlines()
    assert lines, f"{name} has no docstring to read its signature from"
    if len(lines) > 1 and lines[1].strip() == "Overloaded function.":
        sigs = []
        for ln in lines[2:]:
            head, _, rest = ln.strip().partition(". ")
            if head.isdigit() and rest.startswith(name + "("):
                sigs.append(_parse_signature(rest, name))
        return sigs
    return [_parse_signature(lines[0], name)]


def _public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def _module_members() -> dict:
    out = {}
    for n in _public(dir(_core)):
        obj = getattr(_core, n)
        if isinstance(obj, type):
            members = {}
            for k, v in vars(obj).items():
                if isinstance(v, property):
                    members[k] = ("property", v.fset is not None)
                elif k == "__init__" or (not k.startswith("_") and callable(v)):
                    members[k] = ("function", v)
                elif not k.startswith("_"):
                    members[k] = ("attr",)
            out[n] = ("class", members)
        elif callable(obj):
            out[n] = ("function", obj)
        else:
            out[n] = ("attr",)
    return out


# ------------------------------------------------------------------------------------ the tests
def test_stub_names_every_public_binding(stub):
    runtime = _module_members()
    missing = sorted(set(runtime) - _public(stub))
    extra = sorted(_public(stub) - set(runtime))
    assert not missing, f"hiquant._core exports {missing} but _core.pyi does not declare them"
    assert not extra, f"_core.pyi declares {extra} but hiquant._core does not export them"
    for name, (kind, *_) in runtime.items():
        assert stub[name][0] == kind, (
            f"{name} is a {kind} in _core but a {stub[name][0]} in the stub")


def test_stub_classes_have_the_same_members(stub):
    for name, (kind, *rest) in _module_members().items():
        if kind != "class" or stub.get(name, ("",))[0] != "class":
            continue
        members, declared = rest[0], stub[name][1]
        want = set(members)
        have = _public(declared) | ({"__init__"} & set(declared))
        assert want == have, (f"{name}: _core has {sorted(want - have)} not in the stub, the stub "
                              f"has {sorted(have - want)} not in _core")
        for k, (mkind, *info) in members.items():
            assert declared[k][0] == mkind, (
                f"{name}.{k}: a {mkind} in _core, a {declared[k][0]} in the stub")
            if mkind == "property":
                assert declared[k][1] == info[0], (
                    f"{name}.{k}: settable={info[0]} in _core but not in the stub (add or drop "
                    f"the @{k}.setter)")


def _function_pairs(stub):
    """(qualified name, runtime object, stub signatures) of every function both sides declare (the
    tests above report names on one side only)."""
    for name, (kind, *rest) in _module_members().items():
        if kind == "function" and stub.get(name, ("",))[0] == "function":
            yield name, rest[0], stub[name][1]
        elif kind == "class" and stub.get(name, ("",))[0] == "class":
            declared = stub[name][1]
            for k, (mkind, *info) in rest[0].items():
                if mkind == "function" and declared.get(k, ("",))[0] == "function":
                    yield f"{name}.{k}", info[0], declared[k][1]


def test_stub_parameters_match_pybind_signatures(stub):
    checked = 0
    for qualname, obj, stub_sigs in _function_pairs(stub):
        runtime_sigs = _runtime_signatures(obj, qualname.rsplit(".", 1)[-1])
        names = [[p for p, _ in s] for s in runtime_sigs]
        stub_names = [[p for p, _ in s] for s in stub_sigs]
        assert stub_names == names, (
            f"{qualname}: parameters {names} in _core but {stub_names} in _core.pyi")
        assert stub_sigs == runtime_sigs, (
            f"{qualname}: which parameters have defaults differs: _core {runtime_sigs}, "
            f"stub {stub_sigs}")
        checked += 1
    assert checked >= 30  # the test really walked the bindings


def test_signature_parser_reads_pybind_docstrings():
    line = ("f(a: object, b: typing.SupportsInt | typing.SupportsIndex = 0, "
            "c: str = 'x, y', d: tuple[int, int] = (1, 2)) -> dict")
    assert _parse_signature(line, "f") == [("a", False), ("b", True), ("c", True), ("d", True)]
    assert _parse_signature("g() -> None", "g") == []


# ------------------------------------------------------------------------- binding errors
def _f32(*shape):
    return np.zeros(shape, np.float32)


def _bad_calls():
    """(what, call, expected class): a wrong dtype, a non-contiguous array and a bad shape for a
    few bindings of each concern."""
    W, H = _f32(8, 16), np.eye(16)
    G = np.zeros((16, 16))
    M, costs = np.eye(4), np.array([[1, 2], [1, 2]], np.int64)
    E, A = hiquant.InvalidTypeError, hiquant.InvalidArgumentError
    return [
        ("dtype", lambda: _core.fake_quantize(W.astype(np.float64), 4, 8), E),
        ("dtype", lambda: _core.gram_accumulate(G, np.ones((4, 16), np.float64)), E),
        ("dtype", lambda: _core.gemm(W, np.ones((16, 4), np.int32)), E),
        ("dtype", lambda: _core.solve_iqp(M.astype(np.float32), costs, 3), E),
        ("dtype", lambda: _core.gptq(W, H.astype(np.float32), 4, 8), E),
        ("dtype", lambda: _core.LwcPart(W.tolist(), 4, 8), E),
        ("type", lambda: _core.adam_step(_core.Adam(4, 0.1), object(), _f32(4)), E),
        ("contiguity", lambda: _core.fake_quantize(_f32(8, 32)[:, ::2], 4, 8), A),
        ("contiguity", lambda: _core.gram_accumulate(G, np.asfortranarray(_f32(4, 16))), A),
        ("contiguity", lambda: _core.gemm(np.asfortranarray(_f32(3, 16)), _f32(16, 4)), A),
        ("contiguity", lambda: _core.LayerwiseObjective(W, np.asfortranarray(H), 10.0), A),
        ("shape", lambda: _core.gemm(W, _f32(15, 4)), A),
        ("shape", lambda: _core.gram_accumulate(np.zeros((15, 15)), _f32(4, 16)), A),
        ("shape", lambda: _core.quantize(W, _f32(8, 3), np.zeros((8, 2), np.uint8), 4, 8), A),
        ("shape", lambda: _core.solve_iqp(np.eye(5), costs, 3), A),
        ("shape", lambda: _core.gptq(W, np.eye(15), 4, 8), A),
        ("range", lambda: _core.fake_quantize(W, 9, 8), A),
        ("range", lambda: _core.solve_iqp(M, costs, 3, method="fast"), A),
    ]


def test_binding_dtype_errors_are_hiquant_errors():
    for what, call, cls in _bad_calls():
        with pytest.raises(hiquant.HiquantError) as info:
            call()
        assert isinstance(info.value, cls), f"{what}: {type(info.value).__name__}: {info.value}"
    # and they stay the built-in classes callers already catch
    assert issubclass(hiquant.InvalidTypeError, TypeError)
    assert issubclass(hiquant.InvalidArgumentError, ValueError)
