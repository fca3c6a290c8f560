"""Tiny but trained GLM checkpoints, written as real Hugging Face folders.

Random weights make agreement metrics meaningless (every logit is near-uniform, so top-1 flips on
noise), so each tiny model is trained a few hundred AdamW steps on a shipped corpus of plain
English until its next-token distributions are peaked. Four shapes mirror the GLM family the
exporter supports: GLM-Edge (full rotary, tied, no bias), GLM-4-9B-chat-hf (half rotary, QKV bias,
untied), GLM-4-0414 (``glm4``: extra post-attention/post-MLP norms) and a GQA shape whose
``head_dim`` is not ``hidden / heads``. Building one takes seconds on two CPU cores.

The folder holds what a real checkpoint holds: ``config.json``, safetensors (fp32, bf16 or fp16,
single or sharded), a byte-level BPE ``tokenizer.json`` with GLM's special tokens and a GLM-4
chat template, ``generation_config.json`` with GLM-4's three stop tokens, plus ``training.json``.

Besides prose and chat turns, the training text holds a small structured slice built from the
corpus's own sensor readings (:func:`structured_slice`): the same reading asked for in JSON and
answered as a JSON object, and, after GLM-4's tool-prompt closing line, answered with a tool call in
GLM's format (``name\\n{arguments}``), its ``<|observation|>`` result and a short reply. So a tiny
model writes JSON and calls tools by itself in the situations it was taught, and constrained
decoding is tested both where the model cooperates and where it would answer prose.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

__all__ = [
    "DEFAULT_CORPUS",
    "SHAPES",
    "SPECIAL_TOKENS",
    "TinyShape",
    "build_checkpoint",
    "finetune_checkpoint",
    "heldout_prompts",
    "read_corpus",
    "split_corpus",
    "structured_slice",
    "structured_text",
    "train_tokenizer",
]

log = logging.getLogger(__name__)

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus.txt"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
# GLM-4 style: "[gMASK]<sop><|user|>\nhi<|assistant|>\n". The model stops on <|endoftext|>,
# <|user|> or <|observation|>, the same three stop tokens GLM-4 lists.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
_SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HOLDOUT = 0.1
_SEQ_LEN = 64
_BATCH = 16
_LR = 8e-3
_WARMUP = 10


@dataclass(frozen=True)
class TinyShape:
    """The dimensions of one tiny GLM; ``model_type`` picks GlmForCausalLM or Glm4ForCausalLM."""

    name: str
    model_type: Literal["glm", "glm4"]
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    partial_rotary_factor: float
    attention_bias: bool
    tie_word_embeddings: bool
    vocab_size: int = 768
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


# 128 wide, not 64: at 64 the int4 exports' greedy-prefix agreement sat at 0.40-0.70 depending on
# the seed (and on the CPU's kernels, which change the trained weights), around the 0.5 gate; at 128
# it measured at least 0.57 over four seeds for every shape and route (12 prompts), and at least 0.61
# for glm-edge and glm-gqa gated on all 30 held-out prompts, as the tests now are.
SHAPES: dict[str, TinyShape] = {
    s.name: s
    for s in (
        # GLM-Edge 1.5B/4B: full rotary, no QKV bias, tied embeddings.
        TinyShape("glm-edge", "glm", 128, 2, 4, 2, 16, 320, 1.0, False, True),
        # GLM-4-9B-chat-hf: half rotary, QKV bias, untied lm_head, tiny rms eps.
        TinyShape("glm4-9b", "glm", 128, 2, 4, 2, 32, 320, 0.5, True, False, rms_norm_eps=1.5625e-07),
        # GLM-4-0414: Glm4ForCausalLM with post-attention / post-MLP norms.
        TinyShape("glm4-0414", "glm4", 128, 2, 4, 2, 32, 320, 0.5, True, False),
        # GQA 16/4 with head_dim 16: q is 256 wide on a 128 hidden, so head_dim != hidden / heads.
        TinyShape("glm-gqa", "glm", 128, 2, 16, 4, 16, 384, 1.0, False, True),
    )
}


def read_corpus(path: Path = DEFAULT_CORPUS) -> str:
    """The shipped training text (or another UTF-8 file)."""
    return path.read_text(encoding="utf-8")


def split_corpus(corpus: str, holdout: float = _HOLDOUT) -> tuple[str, str]:
    """Split at a paragraph boundary into (train, held-out); the held-out tail is never trained on."""
    blocks = [b for b in corpus.split("\n\n") if b.strip()]
    cut = max(1, round(len(blocks) * (1.0 - holdout)))
    return "\n\n".join(blocks[:cut]), "\n\n".join(blocks[cut:])


def heldout_prompts(corpus: str | None = None, count: int = 30, keep: float = 0.4) -> list[str]:
    """Prompts the model never trained on, in its own domain: the first ``keep`` of held-out lines.

    A tiny model answers out-of-domain prompts with near-uniform guesses, where any rounding flips
    the greedy token; real exports are gated on prompts from the operator's own domain.
    """
    _, held = split_corpus(read_corpus() if corpus is None else corpus)
    lines = [line for line in held.split("\n") if len(line.split()) >= 8]
    step = max(1, len(lines) // count)
    return [" ".join(line.split()[: int(len(line.split()) * keep)]) for line in lines[::step]][:count]


def train_tokenizer(corpus: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE over ``corpus`` with GLM's special tokens at ids 0..9.

    Like GLM-4's tokenizer, encoding with special tokens prepends ``[gMASK]<sop>``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    ids = {t: tok.token_to_id(t) for t in ("[gMASK]", "<sop>")}
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=list(ids.items()),
    )
    return tok


def build_checkpoint(
    out_dir: Path,
    shape: TinyShape | str,
    *,
    steps: int = 400,
    seed: int = 0,
    corpus: str | None = None,
    save_dtype: str = "float32",
    shard_bytes: int | None = None,
) -> Path:
    """Train a tiny GLM of ``shape`` for ``steps`` and write it as a HF folder at ``out_dir``.

    Deterministic for a given (shape, steps, seed, corpus) and thread count. Training is fp32;
    ``save_dtype`` ("float32", "bfloat16", "float16") only casts the saved weights, and
    ``shard_bytes`` splits them into ``model-0000i-of-0000N.safetensors`` with an index.
    """
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    if save_dtype not in _SAVE_DTYPES:
        raise ValueError(f"save_dtype {save_dtype!r} is not one of {sorted(_SAVE_DTYPES)}")
    text, _ = split_corpus(read_corpus() if corpus is None else corpus)
    tok = train_tokenizer(text + "\n\n" + structured_text(text), spec.vocab_size)
    if tok.get_vocab_size() > spec.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, shape allows {spec.vocab_size}")
    stream = torch.tensor(_token_stream(tok, text), dtype=torch.long)

    torch.manual_seed(seed)
    model = _new_model(spec, tok)
    started = time.perf_counter()
    loss = _train(model, stream, steps=steps, seed=seed)
    log.info("trained %s: %d steps, loss %.3f, %.1fs", spec.name, steps, loss, time.perf_counter() - started)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(_SAVE_DTYPES[save_dtype])  # type: ignore[arg-type]  # transformers types .to oddly
    kwargs: dict[str, Any] = {} if shard_bytes is None else {"max_shard_size": shard_bytes}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    _save_tokenizer(tok, out_dir)
    record = {
        "shape": asdict(spec),
        "steps": steps,
        "seed": seed,
        "seq_len": _SEQ_LEN,
        "batch_size": _BATCH,
        "lr": _LR,
        "train_tokens": len(stream),
        "final_loss": round(loss, 4),
        "save_dtype": save_dtype,
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def finetune_checkpoint(
    base: Path,
    out_dir: Path,
    *,
    tensors: tuple[str, ...],
    steps: int = 40,
    seed: int = 1,
    corpus: str | None = None,
) -> Path:
    """Train only ``tensors`` of the checkpoint at ``base`` a few more steps; write it to ``out_dir``.

    Every other weight stays bit-identical, as in a fine-tune that touches a few layers: the
    update the delta sync is built for.
    """
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = {n for n, _ in model.named_parameters()}
    if missing := set(tensors) - names:
        raise ValueError(f"no such weights: {sorted(missing)}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in tensors)
    text, _ = split_corpus(read_corpus() if corpus is None else corpus)
    stream = torch.tensor(_token_stream(tok, text), dtype=torch.long)
    loss = _train(model, stream, steps=steps, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    _save_tokenizer(tok, out_dir)
    record = json.loads((base / "training.json").read_text()) if (base / "training.json").is_file() else {}
    record["finetune"] = {"from": str(base), "tensors": list(tensors), "steps": steps, "final_loss": loss}
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _token_stream(tok: Tokenizer, text: str) -> list[int]:
    """Each paragraph as ``[gMASK]<sop> ... <|endoftext|>``, then its chat pairs in GLM-4 form and
    its structured turns (:func:`structured_slice`)."""
    eot, user = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|user|>")
    out: list[int] = []
    for block in (b.strip() for b in text.split("\n\n")):
        if not block:
            continue
        out += [*tok.encode(block).ids, eot]
        for q, a in _chat_pairs(block):
            out += [*tok.encode(f"<|user|>\n{q}<|assistant|>\n{a}").ids, user]
        for turns in structured_slice(block):
            out += [*tok.encode(turns).ids, user]
    return out


_QUESTION = re.compile(r"^Question: (.+)\nAnswer: (.+)$", re.MULTILINE)
_READING = re.compile(r"^Sensor report \d+\. (Sensor .+? reads [^.]+\.) (.+)$", re.MULTILINE)
_FIELDS = re.compile(
    r"^Sensor report \d+\. (?P<reading>Sensor (?P<id>\S+) on the (?P<machine>\w+)"
    r" (?P<where>(?:in|at) the [^.]+?|on line \w+)"
    r" reads (?P<value>\d+(?:\.\d+)?) (?P<unit>[^.]+)\.) The limit is [^.]+, so the reading is"
    r" (?P<verdict>too high|normal|close to the limit)\.",
    re.MULTILINE,
)
_STATUS = {"too high": "high", "normal": "normal", "close to the limit": "near"}
# The closing line of GLM-4's tool prompt (the system turn that lists the tools; the whole prompt
# is far longer than the 64-token training windows, so the slice keeps the part next to the chat).
TOOL_PROMPT_TAIL = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


def structured_slice(block: str) -> list[str]:
    """The structured turns a paragraph's sensor readings teach, in the chat template's form.

    Every reading: asked for "in JSON", answered with one compact object (the sensor, machine, value
    and a status enum). A reading over its limit, after the tool prompt's closing
    line: a call (``close_valve`` for a valve, else ``open_ticket``) with JSON arguments, the tool's
    ``<|observation|>`` result and a one-line reply.
    """
    out = []
    for m in _FIELDS.finditer(block):
        value = float(m["value"]) if "." in m["value"] else int(m["value"])
        reading = m["reading"]
        answer = {"sensor": m["id"], "machine": m["machine"], "value": value, "status": _STATUS[m["verdict"]]}
        out.append(f"<|user|>\n{reading} Answer in JSON.<|assistant|>\n{json.dumps(answer)}")
        if m["verdict"] != "too high":
            continue
        if m["machine"] == "valve":
            call = "close_valve\n" + json.dumps({"valve": m["id"], "reason": "pressure"})
            reply = f"The valve {m['id']} is closed."
        else:
            summary = f"{m['id']} {m['machine']} too high"
            call = "open_ticket\n" + json.dumps({"summary": summary, "urgent": True})
            reply = f"A ticket is open for the {m['machine']} {m['where']}."
        out.append(
            f"<|system|>\n{TOOL_PROMPT_TAIL}<|user|>\n{reading}<|assistant|>\n{call}"
            f'<|observation|>\n{{"done": true}}<|assistant|>\n{reply}'
        )
    return out


def structured_text(text: str) -> str:
    """Every paragraph's structured turns, one per line (what the tokenizer also learns from)."""
    return "\n".join(t for b in text.split("\n\n") for t in structured_slice(b))


def _chat_pairs(block: str) -> list[tuple[str, str]]:
    """(user, assistant) turns found in a paragraph: Q&A lines, and sensor readings -> verdicts."""
    return [(m[1], m[2]) for m in (*_QUESTION.finditer(block), *_READING.finditer(block))]


def _new_model(spec: TinyShape, tok: Tokenizer) -> PreTrainedModel:
    """A freshly initialised fp32 GlmForCausalLM or Glm4ForCausalLM with GLM-4's token ids."""
    stops = [tok.token_to_id(t) for t in _STOP_TOKENS]
    common = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "partial_rotary_factor": spec.partial_rotary_factor,
        "attention_bias": spec.attention_bias,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "pad_token_id": stops[0],
        "eos_token_id": stops,
        "bos_token_id": tok.token_to_id("<sop>"),
    }
    if spec.model_type == "glm4":
        model: PreTrainedModel = Glm4ForCausalLM(Glm4Config(**common))
    else:
        model = GlmForCausalLM(GlmConfig(**common))
    model.generation_config = GenerationConfig(
        eos_token_id=stops, pad_token_id=stops[0], bos_token_id=common["bos_token_id"], do_sample=False
    )
    return model.float()


def _train(model: PreTrainedModel, stream: torch.Tensor, *, steps: int, seed: int) -> float:
    """AdamW on random ``_SEQ_LEN`` windows, linear warmup then cosine decay; returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=_LR, betas=(0.9, 0.95), weight_decay=0.01, fused=True)

    def lr_at(step: int) -> float:
        if step < _WARMUP:
            return (step + 1) / _WARMUP
        progress = (step - _WARMUP) / max(1, steps - _WARMUP)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    offsets = torch.arange(_SEQ_LEN)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - _SEQ_LEN, (_BATCH,), generator=gen)
        batch = stream[starts[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.item())


def _save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<sop>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token="[MASK]",
        additional_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in {"<sop>", "<|endoftext|>", "[MASK]"}
        ],
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
