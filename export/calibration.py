"""Calibration for GPTQ (``export/gptq.py``): what each linear layer of the fp32 reference sees.

GPTQ needs, per quantized linear, the Hessian ``X^T X`` of its inputs on representative text. The
text is the model's own (data-free calibration, as LLM-QAT does): starting from the tokenizer's
prefix (``[gMASK]<sop>`` for GLM), the fp32 reference samples ``samples`` sequences of ``length``
tokens at temperature 1, half of them opening a chat turn (``<|user|>``) where the vocabulary has
one. So no dataset is needed on the build machine, the text is in the model's own domain and
language mix, and it is never the quality gate's prompts (the gate stays a held-out measurement).
``--calibration FILE`` (a JSON list of strings) gives the operator's own text instead: each string
cut at ``length`` tokens (and the model's positions), at most ``MAX_TOKENS`` in all.

Every hooked linear's inputs are kept as float16 rows ``[tokens, K]`` (float32 where a value
would overflow); :meth:`Calibration.hessian` forms ``X^T X / tokens`` when the builder asks for
it, so at most one Hessian at a time is in memory (at GLM-Edge-1.5B, 2,048 tokens keep about
1.4 GB of rows where all Hessians at once would take 5.6 GB).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CALIBRATION_LENGTH", "CALIBRATION_SAMPLES", "MAX_TOKENS", "Calibration", "calibrate"]

log = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 16
CALIBRATION_LENGTH = 128
# The inputs kept grow with the tokens (about 0.7 MB a token at GLM-Edge-1.5B): operator text is
# cut here. At 2,048 tokens the Hessian of a layer wider than that (1.5B's down projection reads
# 6,144) is rank-deficient and held by GPTQ's damping; a layer-by-layer pass would lift the cap.
MAX_TOKENS = 4096
_F16_MAX = 60000.0


class Calibration:
    """The inputs each quantized linear saw, by the name of its weight tensor (``...q_proj.weight``)."""

    def __init__(self, inputs: dict[str, np.ndarray], tokens: int, source: str) -> None:
        self._inputs = inputs
        self.tokens = tokens
        self.source = source  # "self-generated" or "operator text", for the manifest

    def __contains__(self, weight_name: str) -> bool:
        return weight_name in self._inputs

    def hessian(self, weight_name: str) -> np.ndarray:
        """``X^T X / tokens`` [K, K] float32 of the inputs of the linear whose weight is ``weight_name``."""
        x = self._inputs[weight_name].astype(np.float32)
        return (x.T @ x) / np.float32(len(x))

    def release(self, weight_name: str) -> None:
        """Forget one linear's inputs once it is quantized (memory goes back as the build proceeds)."""
        self._inputs.pop(weight_name, None)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "gptq", "tokens": self.tokens, "source": self.source}


def _prefixes(tokenizer: Any) -> list[list[int]]:
    """Where sampling starts: the tokenizer's own prefix, and that prefix opening a user turn."""
    head = list(tokenizer.encode("").ids)
    user = tokenizer.token_to_id("<|user|>")
    if not head:
        eos = tokenizer.token_to_id("<|endoftext|>")
        head = [eos if eos is not None else 0]
    starts = [head]
    if user is not None:
        starts.append([*head, user])
    return starts


def self_generated(model: Any, tokenizer: Any, samples: int, length: int, seed: int = 0) -> list[list[int]]:
    """``samples`` sequences of up to ``length`` tokens sampled from ``model`` (temperature 1)."""
    import torch
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)  # the export's samples repeat; global RNG untouched
    starts = _prefixes(tokenizer)
    length = min(length, _positions(model, length))
    out: list[list[int]] = []
    steps = sum(length - len(s) for s in starts)
    with tqdm(total=steps, desc="sampling calibration text", unit="step", leave=False) as bar:
        for i, start in enumerate(starts):
            count = samples // len(starts) + (1 if i < samples % len(starts) else 0)
            if not count:
                continue
            ids = torch.tensor([start] * count, dtype=torch.long)
            with torch.no_grad():
                res = model(ids, use_cache=True)
                for _ in range(length - len(start)):
                    probs = torch.softmax(res.logits[:, -1].float(), dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                    ids = torch.cat([ids, nxt], dim=1)
                    res = model(nxt, past_key_values=res.past_key_values, use_cache=True)
                    bar.update(1)
            out += ids.tolist()
    return out


def _positions(model: Any, default: int) -> int:
    return int(getattr(model.config, "max_position_embeddings", default) or default)


def from_texts(tokenizer: Any, texts: Iterable[str], length: int) -> list[list[int]]:
    """The operator's calibration text: each string encoded (with the tokenizer's prefix) and cut
    at ``length``, strings with no token past the prefix skipped, ``MAX_TOKENS`` in all."""
    prefix = len(tokenizer.encode("").ids)
    out: list[list[int]] = []
    budget = MAX_TOKENS
    for text in texts:
        ids = list(tokenizer.encode(text).ids)[: min(length, budget)]
        if len(ids) > prefix:
            out.append(ids)
            budget -= len(ids)
        if budget <= prefix:
            break
    return out


def calibrate(
    folder: Path,
    weight_names: Sequence[str],
    *,
    texts: Sequence[str] | None = None,
    samples: int = CALIBRATION_SAMPLES,
    length: int = CALIBRATION_LENGTH,
    seed: int = 0,
) -> Calibration:
    """Run the fp32 reference of ``folder`` over calibration text; keep the inputs of ``weight_names``.

    ``texts``: the operator's calibration text; None: :func:`self_generated` samples.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from edgeglm.errors import ExportError

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if texts is None:
        sequences = self_generated(model, tokenizer, samples, length, seed)
        source = "self-generated"
    else:
        sequences = from_texts(tokenizer, texts, min(length, _positions(model, length)))
        source = "operator text"
        if not sequences:
            raise ExportError("calibration text", "encodes to no tokens past the tokenizer's prefix")
    wanted = {name.removesuffix(".weight"): name for name in weight_names}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in weight_names}
    modules = dict(model.named_modules())
    missing = sorted(set(wanted) - set(modules))
    if missing:
        raise ExportError("calibration", f"the reference has no linear {missing[0]!r} to calibrate")
    hooks = []
    for module_name, weight_name in wanted.items():

        def keep(_mod: Any, args: tuple[Any, ...], weight_name: str = weight_name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().numpy()
            rows[weight_name].append(x.astype(np.float16) if np.abs(x).max() < _F16_MAX else x.copy())

        hooks.append(modules[module_name].register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            for ids in sequences:
                model(torch.tensor([ids], dtype=torch.long), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = sum(len(s) for s in sequences)
    inputs = {name: np.concatenate(parts) for name, parts in rows.items()}
    del model
    log.info("calibrated %d linears on %d tokens (%s)", len(inputs), tokens, source)
    return Calibration(inputs, tokens, source)
