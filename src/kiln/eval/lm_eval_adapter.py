"""lm-evaluation-harness model ``kiln``: any model kiln convert accepts, scored by Kiln's Scorer.

Needs the optional extra ``lmeval`` (``pip install 'kiln[lmeval]'``). Importing this module
registers the model. From the shell, ``kiln-lm-eval`` is lm-eval's own command line with the
model registered::

    kiln-lm-eval --model kiln --model_args pretrained=runs/demo --tasks hellaswag --limit 100

or use lm-eval's Python API after importing this module::

    import lm_eval
    import kiln.eval.lm_eval_adapter  # noqa: F401  (registers "kiln")

    lm_eval.simple_evaluate(model="kiln", model_args="pretrained=runs/demo,batch_size=8",
                            tasks=["hellaswag"])
"""

from __future__ import annotations

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from kiln.errors import KilnError

    raise KilnError("the lm-eval adapter needs lm-eval (pip install 'kiln[lmeval]').") from e

from kiln.eval.scorer import Scorer


@register_model("kiln")
class KilnLM(LM):
    """loglikelihood / loglikelihood_rolling / generate_until over a Kiln GPT."""

    def __init__(self, pretrained: str, batch_size: int | str = 8, device: str = "cpu",
                 max_length: int | None = None, **_: object) -> None:  # fmt: skip
        super().__init__()
        from kiln.interop.load import load_any

        loaded = load_any(pretrained, device)
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(loaded.model, loaded.tokenizer, bs, max_length and int(max_length))
        self.tokenizer = loaded.tokenizer

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [ll for ll, _ in self.scorer.loglikelihood_rolling([r.args[0] for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            out.append(self.scorer.generate_until(context, until, max_new))
        return out


def main() -> None:
    """``kiln-lm-eval``: ``lm_eval``'s command line, with the ``kiln`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
