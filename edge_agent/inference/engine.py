"""A loaded bundle, ready to answer: graph, tokenizer, stop tokens, the profile's limits.

:meth:`Engine.load` reads the bundle folder (manifest, ``model.onnx``, tokenizer files); with
``trusted`` keys it also verifies the manifest signature and every file digest first.
:meth:`Engine.prepare` turns a wire :class:`~edgeglm.protocol.InferRequest` into a tokenized
:class:`Prompt` or raises :class:`~edgeglm.errors.RequestError` (``unknown_model``,
``too_long``, ``bad_request``; a ``response_format`` that does not compile is ``bad_request`` naming
it). :meth:`Engine.generate` is the direct batch-1 loop (the CLI's
``agent infer``, smoke tests); concurrent serving goes through the scheduler.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.inference.codec import Codec
from edge_agent.inference.constraint import Constraints
from edge_agent.inference.generation import Generation, GenerationResult, OnDone, OnText, Prompt
from edge_agent.inference.runtime import DecoderGraph, open_graph
from edge_agent.inference.sampling import SamplingParams
from edge_agent.inference.tools import plan, render
from edgeglm.bundle import Manifest, load_manifest, verify_files
from edgeglm.errors import ConfigError, EdgeError, ProtocolError, RequestError
from edgeglm.profiles import DeviceProfile, load_profile
from edgeglm.protocol import InferRequest

__all__ = ["Engine", "EngineLimits", "effective_profile"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_context: int
    max_batch_size: int
    batch_wait_ms: int


def effective_profile(manifest: Manifest, override: DeviceProfile | None, folder: Path) -> DeviceProfile:
    """The profile a bundle is served with: ``override`` when the box names one explicitly (same
    name), else the one the export recorded in the manifest, else (a bundle from before that was
    recorded) the shipped profile of the bundle's profile name."""
    if override is not None:
        if override.name != manifest.profile:
            raise ConfigError(
                f"bundle {folder}", f"was built for profile {manifest.profile!r}, not {override.name!r}"
            )
        recorded = manifest.device_profile
        if recorded is not None and override.serving() != recorded.serving():
            log.info(
                "serving %s with the box's own profile %s, not the one it was gated with",
                folder,
                override.name,
            )
        return override
    if manifest.device_profile is not None:
        return manifest.device_profile
    try:
        return load_profile(manifest.profile)
    except EdgeError as exc:
        raise ConfigError(
            f"bundle {folder}",
            f"records no device profile and {manifest.profile!r} is not a profile here: {exc.why}",
            hint="Give the profile file (--profile PATH), or re-export the bundle with this release.",
        ) from exc


class Engine:
    def __init__(
        self, folder: Path, manifest: Manifest, profile: DeviceProfile, graph: DecoderGraph, codec: Codec
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.profile = profile
        self.graph = graph
        self.codec = codec
        self.model = manifest.model
        self.version = manifest.version
        self.limits = EngineLimits(profile.max_context, profile.max_batch_size, profile.batch_wait_ms)
        self.stop_tokens = frozenset(self._stop_tokens())
        vocab = graph.vocab or codec.tokenizer.get_vocab_size(with_added_tokens=True)
        self.constraints = Constraints(folder / "tokenizer.json", vocab, sorted(self.stop_tokens))

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        profile: DeviceProfile | None = None,
        trusted: Mapping[str, Any] | None = None,
        threads: int | None = None,
    ) -> Engine:
        folder = Path(folder)
        manifest, _ = load_manifest(folder, trusted)
        if trusted is not None:
            verify_files(manifest, folder)
        profile = effective_profile(manifest, profile, folder)
        graph_route = manifest.runtime.graph or profile.graph
        t0 = time.perf_counter()
        graph = open_graph(
            folder / "model.onnx",
            graph=graph_route,
            providers=profile.execution_providers,
            threads=profile.intra_op_threads if threads is None else threads,
            max_context=profile.max_context,
            rows=profile.max_batch_size + 1,  # one spare row for direct calls (smoke test, CLI)
            prefix_cache_bytes=profile.prefix_cache_mb * 2**20,
        )
        log.info(
            "loaded %s@%s (%s, %s) in %.2fs",
            manifest.model,
            manifest.version,
            graph_route,
            graph.provider,
            time.perf_counter() - t0,
        )
        return cls(folder, manifest, profile, graph, Codec(folder))

    def _stop_tokens(self) -> set[int]:
        smoke = self.manifest.smoke_test
        if smoke is not None and smoke.stop_tokens:
            return set(smoke.stop_tokens)
        path = self.folder / "generation_config.json"
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        if isinstance(eos, int):
            return {eos}
        if isinstance(eos, list):
            return {int(t) for t in eos}
        found = self.codec.token_id("<|endoftext|>")
        return set() if found is None else {found}

    # ---------------------------------------------------------------------------- requests
    def prepare(self, request: InferRequest, *, deadline: float | None = None) -> Prompt:
        if request.model is not None and request.model != self.model:
            raise RequestError("unknown_model", f"this agent serves {self.model!r}, not {request.model!r}")
        tools = plan(request)
        try:
            if request.messages is not None:
                ids = self.codec.encode_chat(render(request.messages, tools))
            else:
                assert request.prompt is not None
                ids = self.codec.encode(request.prompt)
        except ProtocolError as exc:
            raise RequestError("bad_request", exc.why) from exc
        room = self.limits.max_context - len(ids)
        if room < 1:
            raise RequestError(
                "too_long",
                f"the prompt is {len(ids)} tokens; the context holds {self.limits.max_context}"
                " (prompt and completion together)",
            )
        sampling = SamplingParams(
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            seed=request.seed,
        )
        grammar = self.constraints.compile(request.response_format)
        if tools is not None and (lark := tools.lark()) is not None:
            grammar = self.constraints.compile_lark(lark, "tools")
        return Prompt(
            ids=tuple(ids),
            max_tokens=min(request.max_tokens, room),
            sampling=sampling,
            stop=request.stop,
            stream=request.stream,
            deadline=deadline,
            grammar=grammar,
            tools=tools,
            logprobs=request.top_logprobs if request.logprobs else None,
        )

    def start(
        self, prompt: Prompt, on_text: OnText | None = None, on_done: OnDone | None = None
    ) -> Generation:
        """A generation for ``prompt``, not yet running (the scheduler or :meth:`generate` runs it)."""
        return Generation(prompt, self.codec, self.stop_tokens, self.limits.max_context, on_text, on_done)

    def generate(self, prompt: Prompt, on_text: OnText | None = None) -> GenerationResult:
        """Run ``prompt`` alone, start to finish, on the spare KV row."""
        gen = self.start(prompt, on_text)
        gen.started = time.monotonic()
        seq = gen.seq = self.graph.open()
        try:
            gen.accept(self.graph.prefill(seq, prompt.ids, cache=prompt.prefix_cache))
            gen.prefilled = time.monotonic()
            while not gen.done:
                gen.accept(self.graph.decode([seq], [gen.last])[0])
        finally:
            self.graph.close(seq)
        assert gen.result is not None
        return gen.result
