"""hiquant as an lm-evaluation-harness model (``lm_eval``, the optional extra ``[eval]``).

:class:`HiquantLM` runs lm-eval's requests through hiquant's own runtime — a Hugging Face folder
or a packed export (:func:`hiquant.packed.open_checkpoint`), activation quantization included
(``abits``, or what the packed export records) — so zero-shot accuracies are measured on exactly
the weights hiquant evaluated:

* ``loglikelihood``: lm-eval's context/continuation encoding (:class:`lm_eval.api.model.TemplateLM`,
  the same as its ``hf`` model's), then the sum of the continuation tokens' log-probabilities
  (float64 log-softmax of the runtime's float32 logits) and whether each is the argmax;
* ``loglikelihood_rolling``: lm-eval's rolling disjoint windows of ``max_length`` tokens;
* ``generate_until``: greedy decoding (the runtime has no KV cache: each step runs the window
  again, fine for the small models this runtime serves), stopped at any ``until`` string or after
  ``max_gen_toks`` tokens.

lm-eval finds models by name in its registry, which has no plug-in entry point: importing this
module registers ``hiquant``; ``python -m hiquant.harness`` is lm-eval's command line with it
registered::

    python -m hiquant.harness --model hiquant --model_args path=OUT/packed \\
        --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,mmlu --batch_size 8
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

try:
    import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the optional extra
    raise ImportError("hiquant.harness needs lm-eval: pip install 'hiquant[eval]'") from e

__all__ = ["HiquantLM"]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@register_model("hiquant")
class HiquantLM(TemplateLM):
    """lm-eval model over hiquant's runtime. Arguments (``--model_args``): ``path`` (or
    ``pretrained``) a HF folder or packed export; ``max_length`` (default: the config's
    ``max_position_embeddings``); ``max_gen_toks`` (256); ``abits`` (8/6/4: quantize the linears'
    inputs per token; default: the packed export's setting); ``batch_size`` (sequences of equal
    length per forward)."""

    def __init__(self, path=None, pretrained=None, max_length=None, max_gen_toks=256,
                 abits=None, batch_size=1, **kwargs):
        super().__init__()
        from .errors import InvalidArgumentError
        from .packed import open_checkpoint
        folder = path or pretrained
        if folder is None:
            raise InvalidArgumentError("pass the model folder: --model_args path=DIR")
        self.model = open_checkpoint(folder)
        if self.model.tokenizer is None:
            raise InvalidArgumentError(f"{folder} has no tokenizer.json; lm-eval needs the tokenizer")
        if abits is not None:
            self.model.set_activation_bits(int(abits))
        raw = json.loads((Path(folder) / "config.json").read_text())
        eos = raw.get("eos_token_id")
        self._eot = int(eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        self._max_length = int(max_length or raw.get("max_position_embeddings") or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = max(1, int(batch_size))

    # ---- what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.model.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids)

    def tok_decode(self, tokens) -> str:
        return self.model.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def _logprobs(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """Log-probabilities ``(T, vocab)`` of each token sequence, equal lengths batched."""
        out: list = [None] * len(seqs)
        by_len: dict = {}
        for i, s in enumerate(seqs):
            by_len.setdefault(len(s), []).append(i)
        for T, idx in by_len.items():
            for a in range(0, len(idx), self.batch_size):
                part = idx[a:a + self.batch_size]
                logits = self.model.logits(np.array([seqs[i] for i in part], np.int64))
                for k, i in enumerate(part):
                    out[i] = _log_softmax(logits[k])
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        seqs, conts = [], []
        for _, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            seqs.append(whole[:-1])
            conts.append(continuation_enc)
        res = []
        for lp, seq, cont in zip(self._logprobs(seqs), seqs, conts):
            n = len(cont)
            rows = lp[len(seq) - n:]
            tgt = np.asarray(cont)
            ll = float(rows[np.arange(n), tgt].sum())
            greedy = bool(np.all(rows.argmax(axis=-1) == tgt))
            res.append((ll, greedy))
            if (hook := getattr(self, "cache_hook", None)) is not None:
                hook.add_partial("loglikelihood", None, (ll, greedy))
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            ll = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            out.append(float(sum(x for x, _ in ll)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or [self.tok_decode([self.eot_token_id])]
            if isinstance(until, str):
                until = [until]
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-self.max_length:]
            if not ids:
                ids = [self.prefix_token_id]
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                window = (ids + new)[-self.max_length:]
                logits = self.model.logits(np.array([window], np.int64))[0, -1]
                tok = int(np.argmax(logits))
                if tok == self.eot_token_id:
                    break
                new.append(tok)
                text = self.tok_decode(new)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def main(argv=None) -> int:
    """lm-eval's command line with ``hiquant`` registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
