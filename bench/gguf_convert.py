"""The bench checkpoint as GGUF: llama.cpp's own converter, then ``llama-quantize``.

``convert_hf_to_gguf.py`` from the vendored llama.cpp tree runs unchanged but for one runtime patch:
it names the BPE pre-tokenizer by hashing how the tokenizer splits a probe text and refuses hashes it
does not know. Our bench tokenizer is trained locally (``export.tiny_glm``), so no published hash can
match; GLM models use llama.cpp's ``chatglm-bpe`` pre-tokenizer, which :func:`patch_pre_tokenizer`
returns where the converter would refuse. Only the vocabulary's metadata is affected, never the
weights, and decode speed does not depend on it. And one fix of the result: our tokenizer's
post-processor makes the converter write ``add_bos_token = true`` with no BOS token to add (GLM has
none; llama.cpp's GLM converter writes ``false`` and is overruled), which ``llama-bench`` turns into
an abort on its first token; :func:`no_bos_without_token` sets it back to false in place.

    python -m bench.gguf_convert LLAMA_CPP_SRC HF_DIR OUT.gguf   (runs in its own process)
"""

from __future__ import annotations

import functools
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

GLM_PRE_TOKENIZER = "chatglm-bpe"
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")


def patch_pre_tokenizer(text_model: Any) -> None:
    """Make ``text_model.get_vocab_base_pre`` answer ``chatglm-bpe`` for an unknown tokenizer hash."""
    original = text_model.get_vocab_base_pre
    if getattr(original, "_edgeglm_patched", False):
        return

    @functools.wraps(original)
    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(original(self, tokenizer))
        except NotImplementedError:
            print(f"gguf_convert: unknown pre-tokenizer, using {GLM_PRE_TOKENIZER!r}", file=sys.stderr)
            return GLM_PRE_TOKENIZER

    get_vocab_base_pre._edgeglm_patched = True  # type: ignore[attr-defined]
    text_model.get_vocab_base_pre = get_vocab_base_pre


def no_bos_without_token(fields: dict[str, Any]) -> bool:
    """Whether a GGUF's metadata asks to add a BOS token it does not define (then it is cleared)."""
    return bool(fields.get("tokenizer.ggml.add_bos_token")) and "tokenizer.ggml.bos_token_id" not in fields


def _clear_add_bos(path: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    values = {name: f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer.ggml.")}
    values.pop("tokenizer.ggml.tokens", None)
    if field is not None and no_bos_without_token(values):
        field.parts[field.data[0]][0] = 0  # a bool, rewritten in the mapped file
        reader.data.flush()  # type: ignore[attr-defined]


def convert(llama_src: Path, hf_dir: Path, out: Path) -> Path:
    """``hf_dir`` as a bf16 GGUF at ``out`` (in a child process: the converter owns its sys.path)."""
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        cmd = [sys.executable, "-m", "bench.gguf_convert", str(llama_src), str(hf_dir), str(tmp)]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
        tmp.replace(out)
    return out


def quantize(llama_quantize: Path, source: Path, out: Path, quant: str, threads: int) -> Path:
    if quant not in QUANTS:
        raise ValueError(f"unsupported quantization {quant!r}; the bench uses {QUANTS}")
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        cmd = [str(llama_quantize), str(source), str(tmp), quant, str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"llama-quantize {quant} failed: {proc.stderr[-2000:]}")
        tmp.replace(out)
    return out


def _run_converter(llama_src: Path, hf_dir: Path, out: Path) -> None:
    sys.path[:0] = [str(llama_src), str(llama_src / "gguf-py")]
    from conversion import base  # the vendored converter's package

    patch_pre_tokenizer(base.TextModel)
    script = llama_src / "convert_hf_to_gguf.py"
    sys.argv = [str(script), str(hf_dir), "--outtype", "bf16", "--outfile", str(out)]
    runpy.run_path(str(script), run_name="__main__")
    _clear_add_bos(out)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python -m bench.gguf_convert LLAMA_CPP_SRC HF_DIR OUT.gguf")
    _run_converter(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
