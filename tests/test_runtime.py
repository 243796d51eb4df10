"""The runtime protocol (hiquant.runtime): the NumPy Model implements every member with a
compatible signature, the stages reach models only through public names, and the runtime's
public sizing and grouping members agree with what the forward pass does."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

import hiquant
from hiquant.model import Model, load_model
from hiquant.runtime import ModelLoader, ModelRuntime

PACKAGE = Path(hiquant.__file__).parent


def _protocol_members(proto) -> dict:
    out = {}
    for name, value in vars(proto).items():
        if name.startswith("_"):
            continue
        if callable(value) or isinstance(value, property):
            out[name] = value
    for name in getattr(proto, "__annotations__", {}):
        out.setdefault(name, None)
    return out


def test_numpy_model_satisfies_the_runtime_protocol(tiny_llama):
    folder, _, _ = tiny_llama
    m = load_model(folder)
    assert isinstance(m, ModelRuntime)
    for name in _protocol_members(ModelRuntime):
        assert hasattr(m, name), f"Model lacks the protocol member {name}"


def _compatible(impl, spec) -> list[str]:
    """Problems with ``impl`` accepting every call ``spec`` describes: the same parameters
    (name, kind, default) in order; extra parameters only with defaults."""
    a, b = inspect.signature(impl).parameters, inspect.signature(spec).parameters
    problems = []
    for name, p in b.items():
        q = a.get(name)
        if q is None:
            problems.append(f"missing parameter {name}")
        elif q.kind != p.kind:
            problems.append(f"{name} is {q.kind.description}, protocol says {p.kind.description}")
        elif p.default is not inspect.Parameter.empty and q.default != p.default:
            problems.append(f"{name} defaults to {q.default!r}, protocol says {p.default!r}")
    if [n for n in a if n in b] != list(b):
        problems.append(f"parameter order {list(a)} differs from {list(b)}")
    problems += [f"extra parameter {n} has no default" for n, q in a.items()
                 if n not in b and q.default is inspect.Parameter.empty
                 and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    return problems


@pytest.mark.parametrize("name", sorted(n for n, v in _protocol_members(ModelRuntime).items()
                                        if inspect.isfunction(v)))
def test_every_protocol_method_has_a_compatible_signature_on_the_numpy_model(name):
    impl, spec = getattr(Model, name), getattr(ModelRuntime, name)
    assert inspect.isfunction(impl), f"Model.{name} is not a method"
    assert not _compatible(impl, spec), f"Model.{name}: {_compatible(impl, spec)}"


def test_num_blocks_is_a_property_on_both():
    assert isinstance(vars(ModelRuntime)["num_blocks"], property)
    assert isinstance(inspect.getattr_static(Model, "num_blocks"), property)


def test_load_model_has_the_loader_signature():
    assert not _compatible(load_model, ModelLoader.__call__.__get__(object()))


def test_every_protocol_member_is_documented():
    for name, v in _protocol_members(ModelRuntime).items():
        if v is not None:
            doc = v.fget.__doc__ if isinstance(v, property) else v.__doc__
            assert doc and doc.strip(), f"ModelRuntime.{name} has no docstring"


# ------------------------------------------------------------------------------ private access


def _module_aliases(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def _own_private_names(tree: ast.Module) -> set[str]:
    """Private names this module defines: attributes it assigns (``x._a = ...``, ``self._a``),
    methods and class attributes of its classes, its ``__slots__`` entries."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    own.add(t.id)
                    if t.id == "__slots__" and isinstance(node.value, (ast.Tuple, ast.List)):
                        own.update(e.value for e in node.value.elts
                                   if isinstance(e, ast.Constant) and isinstance(e.value, str))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
    return own


def _private_accesses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    modules, own = _module_aliases(tree), _own_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            continue
        base = node.value
        if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in modules):
            continue
        if node.attr in own:  # the module's own private names: its classes' internals
            continue
        found.append(f"{path.name}:{node.lineno}: {ast.unparse(base)}.{node.attr}")
    return found


def test_no_module_reaches_into_another_objects_private_attributes():
    """``x._name`` is only allowed on self/cls, on an imported module (``_core.f``), or for a
    private name the module itself defines (its own classes' internals)."""
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) for hit in _private_accesses(p)]
    assert not found, "private attributes reached from outside their module:\n" + "\n".join(found)


def test_no_stage_reaches_into_the_model_runtime_private_names(tiny_llama):
    """Stronger for the runtime: no module but model.py names any private attribute a Model has,
    whatever the module defines itself, so a PyTorch runtime can stand in."""
    m = load_model(tiny_llama[0])
    private = {n for n in set(vars(m)) | set(dir(Model)) if n.startswith("_")
               and not n.startswith("__")}
    found = []
    for p in sorted(PACKAGE.rglob("*.py")):
        if p.name == "model.py":
            continue
        tree = ast.parse(p.read_text(), str(p))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{p.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_the_private_access_check_catches_a_model_private(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import numpy as _np\n\nclass A:\n    def f(self, model):\n"
                   "        self._x = _np._NoValue\n        return model._where, model.public, "
                   "self._x, other._x\n")
    assert [h.split(": ")[1] for h in _private_accesses(bad)] == ["model._where"]


# ------------------------------------------------------------------------------ public members


def test_input_groups_are_the_layers_capture_gives_the_same_array(tiny_llama):
    folder, cfg, _ = tiny_llama
    m = load_model(folder)
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(2, 6))
    seen = {}
    m.block_forward(1, m.embed(ids), capture=lambda n, X: seen.setdefault(n, X))
    groups = m.input_groups(1)
    assert [n for g in groups for n in g] == m.block_linear_names(1)
    for g in groups:
        assert all(seen[n] is seen[g[0]] for n in g)
    firsts = [seen[g[0]] for g in groups]
    assert all(a is not b for i, a in enumerate(firsts) for b in firsts[i + 1:])


def test_activation_bytes_bounds_what_a_cached_forward_keeps(tiny_llama):
    folder, cfg, _ = tiny_llama
    m = load_model(folder)
    T = 40
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(1, T))
    _, cache = m.block_forward(0, m.embed(ids), cache=True)
    assert cache.nbytes() <= m.activation_bytes(T) <= 2 * cache.nbytes()


def test_auto_batch_follows_activation_bytes(tiny_llama):
    m = load_model(tiny_llama[0])
    assert m.auto_batch(64) == 8 and m.auto_batch(1024) == 1
    T = 128
    assert m.auto_batch(T, budget=m.activation_bytes(T) * 3) == 3
    assert m.auto_batch(T, budget=1) == 1


def test_check_ids_and_check_seqlen_are_public_and_raise_hiquant_errors(tiny_checkpoint):
    folder, cfg, _ = tiny_checkpoint("MistralForCausalLM", sliding_window=8)
    m = load_model(folder)
    ok = np.zeros((1, 4), np.int64)
    assert m.check_ids(ok) is ok
    with pytest.raises(hiquant.InvalidTypeError, match="windows must be an integer"):
        m.check_ids(ok.astype(np.float32), "windows")
    with pytest.raises(hiquant.InvalidArgumentError, match="seqlen >= 2"):
        m.check_ids(ok[:, :1], min_len=2)
    with pytest.raises(hiquant.InvalidArgumentError, match="outside the vocabulary"):
        m.check_ids(ok + cfg["vocab_size"])
    m.check_seqlen(8)
    with pytest.raises(hiquant.InvalidArgumentError, match="sliding attention window"):
        m.check_seqlen(9)


def test_source_tensors_list_every_stored_tensor_with_its_bytes(tiny_llama):
    from safetensors.numpy import load_file
    folder, _, _ = tiny_llama
    m = load_model(folder)
    stored = load_file(str(Path(folder) / "model.safetensors"))
    src = m.source_tensors()
    assert [t.name for t in src] == sorted(stored)
    for t in src:
        a = stored[t.name]
        assert t.shape == a.shape and t.dtype == "F32"
        assert bytes(t.read()) == a.tobytes()


# ------------------------------------------------------------------------------ the worker pool


def test_map_ordered_keeps_item_order_for_any_worker_count():
    from hiquant._threads import map_ordered
    for nt in (1, 2, 4):
        assert map_ordered(lambda x: x * x, range(9), nt) == [x * x for x in range(9)]


def test_map_ordered_calls_on_error_then_reraises_the_first_failure():
    import threading
    import time

    from hiquant._threads import map_ordered
    release = threading.Event()
    calls = []

    def fn(x):
        if x == 0:
            raise KeyError("item 0")
        release.wait(10)  # item 1 waits on item 0, as the statistics' turnstiles do
        return x

    t0 = time.perf_counter()
    with pytest.raises(KeyError, match="item 0"):
        map_ordered(fn, [0, 1], 2, on_error=lambda: (calls.append(1), release.set()))
    assert calls == [1] and time.perf_counter() - t0 < 5  # the waiting worker was released
