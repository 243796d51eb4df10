"""The embedded default model and corpus shipped in python/hiquant/data (see its README.md)."""

from __future__ import annotations

import importlib.util
import json
import platform
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from hiquant.datasets import (
    embedded_calib_path,
    embedded_model_path,
    embedded_recipe,
    embedded_test_path,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_embedded_model.py"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
               "recipe.json")
LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "mlp": ("gate_proj", "up_proj", "down_proj")}


@pytest.fixture(scope="module")
def config():
    return json.loads((embedded_model_path() / "config.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def recipe():
    return embedded_recipe()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(embedded_model_path() / "tokenizer.json"))


@pytest.fixture(scope="module")
def test_ids(tokenizer):
    return np.asarray(tokenizer.encode(embedded_test_path().read_text("utf-8")).ids, np.int64)


def _script_module():
    if not SCRIPT.exists():
        pytest.skip("scripts/make_embedded_model.py is not present (installed package only)")
    spec = importlib.util.spec_from_file_location("make_embedded_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def expected_shapes(cfg: dict) -> dict:
    d, hd, m, v = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (nq, d), p + "self_attn.k_proj.weight": (nkv, d),
            p + "self_attn.v_proj.weight": (nkv, d), p + "self_attn.o_proj.weight": (d, nq),
            p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d),
            p + "mlp.down_proj.weight": (d, m),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    return out


# -- the shipped files --------------------------------------------------------------------------

def test_shipped_files_exist_inside_the_package_and_are_small():
    pkg = Path(importlib.util.find_spec("hiquant").origin).parent
    mdir = embedded_model_path()
    assert mdir.is_dir() and mdir.resolve().is_relative_to(pkg.resolve())
    for name in MODEL_FILES:
        assert (mdir / name).is_file(), name
    assert (mdir / "model.safetensors").stat().st_size < 4_000_000  # "a few MB at most"
    for path in (embedded_calib_path(), embedded_test_path()):
        assert 150_000 <= path.stat().st_size <= 400_000, path
    assert (mdir.parent / "README.md").is_file()


def test_config_is_a_transformers5_llama_config_with_gqa(config):
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["dtype"] == "float16" and "torch_dtype" not in config
    assert config["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert "rope_theta" not in config  # 5.x keeps it only inside rope_parameters
    assert config["tie_word_embeddings"] is False and config["hidden_act"] == "silu"
    assert config["num_attention_heads"] * config["head_dim"] == config["hidden_size"]
    # GQA proper: fewer kv heads than query heads, an integer number of query heads per kv head.
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0


def test_tensor_names_and_shapes_match_the_config(config):
    with safe_open(str(embedded_model_path() / "model.safetensors"), "np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == expected_shapes(config)


def test_weights_are_float16_finite_and_trained(config):
    with safe_open(str(embedded_model_path() / "model.safetensors"), "np") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            assert t.dtype == np.float16, k
            assert np.isfinite(t).all(), k
        # trained, not the initialization: RMSNorm gains moved away from 1
        assert np.abs(f.get_tensor("model.norm.weight").astype(np.float32) - 1).max() > 0.05


def test_tokenizer_round_trips_text_and_matches_the_config(tokenizer, config):
    assert tokenizer.get_vocab_size() == config["vocab_size"]
    assert tokenizer.token_to_id("<|endoftext|>") == config["bos_token_id"] == 0
    text = embedded_test_path().read_text("utf-8")[:20_000]
    samples = [text, "def f(x):\n\treturn x ** 2  # é, 漢字, emoji 🙂\n", "  leading spaces", ""]
    for s in samples:
        assert tokenizer.decode(tokenizer.encode(s).ids) == s


def test_corpus_is_held_out_and_consistent_with_the_recipe(recipe, tokenizer):
    split = recipe["split"]
    test_files, calib_files = set(split["files_test"]), set(split["files_calib"])
    assert test_files and calib_files and not test_files & calib_files
    for name, path in (("test", embedded_test_path()), ("calib", embedded_calib_path())):
        text = path.read_text("utf-8")
        assert len(text) == split["chars"][name]
        assert len(tokenizer.encode(text).ids) == split["tokens"][name]


def test_recipe_records_how_to_reproduce_and_what_was_measured(recipe, config):
    assert recipe["quick"] is False
    for key in ("python", "versions", "split", "tokenizer", "model", "training", "test_ppl_seq256",
                "test_ppl_seq256_first_windows", "rtn_test_ppl_seq256"):
        assert key in recipe, key
    t = recipe["training"]
    assert t["threads"] == 1 and t["steps"] > 0 and t["tokens_seen"] == t["steps"] * t["batch"] * \
        t["seqlen"] and t["wall_seconds"] > 0
    assert recipe["model"]["vocab_size"] == config["vocab_size"]


def test_quantization_effects_are_measurable_on_the_embedded_model(recipe):
    # The reason the model is trained at all: 2-bit RTN must hurt visibly, 4-bit barely.
    fp = recipe["test_ppl_seq256"]
    rtn = {(r["bits"], r["group_size"]): r["test_ppl_seq256"] for r in recipe["rtn_test_ppl_seq256"]}
    assert fp < 60  # learned something: a uniform guess over the vocabulary would be 1024
    assert rtn[(2, 64)] > 1.15 * fp
    assert rtn[(4, 128)] < 1.05 * fp


# -- reproducing the recorded numbers -----------------------------------------------------------

def _first_windows(recipe, test_ids):
    n = recipe["test_ppl_seq256_first_windows"]["n_windows"]
    return test_ids[: n * 256].reshape(n, 256), recipe["test_ppl_seq256_first_windows"]["ppl"]


def _ppl_from_logits(logits: np.ndarray, windows: np.ndarray) -> float:
    """Shared protocol: per-window mean next-token cross-entropy, exp of the mean over windows."""
    z = logits[:, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
    return float(np.exp(nll.mean(axis=1).mean()))


def test_script_torch_forward_reproduces_recipe_perplexity(recipe, test_ids):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    mod = _script_module()
    cfg = dict(json.loads((embedded_model_path() / "config.json").read_text("utf-8")))
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    model = mod.build_torch_model(torch, cfg)
    sd = load_file(str(embedded_model_path() / "model.safetensors"))
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()})
    model.eval()
    windows, expected = _first_windows(recipe, test_ids)
    ppl, _ = mod.perplexity(torch, model, windows.ravel(), 256, len(windows))
    assert ppl == pytest.approx(expected, rel=1e-4)


def test_transformers_llama_reproduces_recipe_perplexity(recipe, test_ids):
    """An independent oracle: the Hugging Face implementation reading the shipped folder."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(embedded_model_path()),
                                                          dtype=torch.float32)
    model.eval()
    windows, expected = _first_windows(recipe, test_ids)
    with torch.no_grad():
        logits = model(torch.from_numpy(windows)).logits.numpy()
    assert _ppl_from_logits(logits, windows) == pytest.approx(expected, rel=1e-4)


def test_corpus_regenerates_byte_for_byte_from_this_python_stdlib(recipe):
    if platform.python_version() != recipe["python"]:
        pytest.skip(f"the corpus was cut from Python {recipe['python']}'s stdlib; this is "
                    f"{platform.python_version()}")
    import sysconfig

    mod = _script_module()
    splits = mod.split_files(mod.stdlib_files(Path(sysconfig.get_paths()["stdlib"])))
    if [p for p, _ in splits["test"]] != recipe["split"]["files_test"]:
        pytest.skip("this interpreter's stdlib differs from the one the corpus was cut from")
    assert mod.join_texts(splits["test"]) == embedded_test_path().read_text("utf-8")
    assert mod.join_texts(splits["calib"]) == embedded_calib_path().read_text("utf-8")
    held_out = {p for p, _ in splits["test"] + splits["calib"]}
    assert not held_out & {p for p, _ in splits["train"]}


def test_hiquant_loads_embedded_model_and_reproduces_recipe_perplexity(recipe, test_ids):
    if importlib.util.find_spec("hiquant.model") is None:
        pytest.skip("hiquant.model is not written yet")
    from hiquant.evaluate import perplexity
    from hiquant.model import load_model

    model = load_model(embedded_model_path())
    n = recipe["test_ppl_seq256_first_windows"]["n_windows"]
    out = perplexity(model, test_ids, 256, n, progress=False)
    assert out["windows"] == n
    assert out["ppl"] == pytest.approx(recipe["test_ppl_seq256_first_windows"]["ppl"], rel=0.01)


def test_script_without_torch_exits_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    if not SCRIPT.exists():
        pytest.skip("scripts/make_embedded_model.py is not present (installed package only)")
    # sys.modules["torch"] = None makes `import torch` raise ImportError, as on a machine without it.
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = ['make_embedded_model.py', '--out', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "PyTorch" in r.stderr and "dev-time dependency" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_script_rtn_matches_hiquant_quantizer_on_the_shipped_weights():
    """The recorded RTN perplexities use the script's own min-max quantizer (so the script needs no
    built hiquant); it must be hiquant's convention exactly."""
    from safetensors.numpy import load_file

    from hiquant.quantizer import fake_quantize

    mod = _script_module()
    sd = load_file(str(embedded_model_path() / "model.safetensors"))
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        W = np.ascontiguousarray(sd[name].astype(np.float32))
        for bits, group in ((2, 64), (4, 128), (2, 0)):
            mine = mod.rtn_fake_quant(W, bits, group).astype(np.float32)
            np.testing.assert_array_equal(mine, fake_quantize(W, bits, group), err_msg=name)


def test_missing_embedded_data_raises_file_not_found_saying_how_to_fix(tmp_path, monkeypatch):
    import hiquant.datasets as ds

    monkeypatch.setattr(ds, "_data_dir", lambda: tmp_path)
    for fn in (ds.embedded_model_path, ds.embedded_calib_path, ds.embedded_test_path,
               ds.embedded_recipe):
        with pytest.raises(FileNotFoundError, match="make_embedded_model.py"):
            fn()
