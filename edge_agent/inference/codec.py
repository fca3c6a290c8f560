"""Text <-> tokens for one bundle: ``tokenizers`` plus the checkpoint's chat template.

The template is ``chat_template.jinja`` (transformers >= 4.47) or ``tokenizer_config.json``'s
``chat_template``.

GLM tokenizers prepend ``[gMASK]<sop>`` when special tokens are added; a chat template already
writes them, so rendered chats are encoded without adding them again. Templates are Jinja, run in
a sandbox (a bundle is signed, but the template is still data, not code).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from edgeglm.errors import ConfigError, ProtocolError

__all__ = ["Codec", "Detokenizer"]


def _raise(message: str) -> None:
    raise TemplateError(message)


class Codec:
    def __init__(self, folder: Path) -> None:
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises plain Exception on a bad file
            raise ConfigError(f"bundle {folder}", f"tokenizer.json does not load: {exc}") from exc
        config_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        jinja = folder / "chat_template.jinja"  # where transformers >= 4.47 saves it
        source = jinja.read_text() if jinja.is_file() else self.config.get("chat_template")
        if isinstance(source, list):  # the named-template form: [{"name": "default", "template": ...}]
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source) if isinstance(source, str) else None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        if self._template is None:
            raise ProtocolError("messages", "this model has no chat template; send 'prompt' instead")
        try:
            text = self._template.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self._special("bos_token"),
                eos_token=self._special("eos_token"),
            )
        except TemplateError as exc:
            raise ProtocolError("messages", f"the chat template refused them: {exc}") from exc
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _special(self, key: str) -> str:
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else ""

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_id(self, token: str) -> int | None:
        found = self.tokenizer.token_to_id(token)
        return None if found is None else int(found)


class Detokenizer:
    """Incremental decoding for streaming: text appears once its bytes form whole characters.

    Decodes a short window (``prefix`` .. end) each step, so the cost per token stays constant;
    text ending in U+FFFD (half a UTF-8 sequence) is held back until the next token completes it.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.codec.decode(self.ids[self._prefix : self._read])
        after = self.codec.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of a generation)."""
        before = self.codec.decode(self.ids[self._prefix : self._read])
        after = self.codec.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]
