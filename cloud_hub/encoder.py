"""What a device is sent for each piece it asks for: the plan against the versions it holds, and
each (piece, base) encoded once.

The MQTT gateway (:mod:`cloud_hub.gateway`) and the HTTP piece routes ask the same encoder, so a
wave of devices moving between the same two versions costs one encoding per piece whichever way
its bytes travel. Plans are cached per (target, versions held). An encoding is looked up in three
places, cheapest first::

    bounded in-memory LRU   this process                    edgeglm_hub_encode_cache_total{result=hit}
    the piece store         every replica on the same store                             {result=store}
    encoded here            then written to the store for the others                    {result=miss}

Requests for one (piece, base) that arrive while it is being made wait for that one read and
encode (single flight: a wave asking for an uncached piece at once encodes it once, counted as
hits), so with the database store one replica's encoding work serves all (two replicas asked at the same
moment may both encode; the store keeps the first and both send the same bytes). An encoding is
stored under the (piece, base) it really is: a delta whose base the store lacks is made and stored
raw.

Manifests are read and parsed once per (model, version, profile) and kept (the last ``bundles``,
least recently used out first): a published bundle never changes (a repair publishes the same
manifest again), and a piece request over HTTP would otherwise read and parse the whole manifest
(35 ms for 8,193 pieces) to find one step. The raw bytes stay with the parsed manifest: the gateway
answers a manifest request with them, exactly as signed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future

from sqlalchemy import select

from cloud_hub.db import Database
from cloud_hub.metrics import HubMetrics
from cloud_hub.models import Bundle, Model, Release
from cloud_hub.piece_storage import EncodingKey, PieceStorage
from edgeglm.bundle import Manifest, parse_manifest
from edgeglm.errors import NotFoundError
from edgeglm.planner import PieceStep, plan
from edgeglm.tensor_delta import Encoded, encode_delta, encode_raw

__all__ = ["PieceEncoder"]


class PieceEncoder:
    def __init__(
        self,
        db: Database,
        store: PieceStorage,
        metrics: HubMetrics,
        *,
        cache_bytes: int = 256 << 20,
        bundles: int = 16,
    ) -> None:
        self.db = db
        self.store = store
        self.metrics = metrics
        self.cache_bytes = cache_bytes
        self._encoded: OrderedDict[EncodingKey, Encoded] = OrderedDict()
        self._cached = 0
        self._plans: OrderedDict[tuple[str, tuple[str, ...]], dict[str, PieceStep]] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[EncodingKey, Future[Encoded]] = {}  # in the making: others wait on it
        self.bundles = bundles
        self._bundles: OrderedDict[tuple[str, str, str], tuple[bytes, Manifest]] = OrderedDict()

    def bundle(self, model: str, version: str, profile: str) -> tuple[bytes, Manifest]:
        """The bundle's manifest exactly as signed, and parsed; NotFoundError if there is none."""
        key = (model, version, profile)
        with self._lock:
            hit = self._bundles.get(key)
            if hit is not None:
                self._bundles.move_to_end(key)
                return hit
        with self.db.session() as s:
            b = s.scalar(
                select(Bundle)
                .join(Release)
                .join(Model)
                .where(Model.name == model, Release.version == version, Bundle.profile == profile)
            )
            if b is None:
                raise NotFoundError(f"bundle {model}@{version}", f"has no build for profile {profile!r}")
            raw = b.manifest_json.encode()
        found = (raw, parse_manifest(raw, None)[0])
        with self._lock:
            self._bundles[key] = found
            while len(self._bundles) > self.bundles:
                self._bundles.popitem(last=False)
        return found

    def steps(self, target: Manifest, have: Iterable[str]) -> dict[str, PieceStep]:
        """Each piece of ``target`` by id: raw, or a delta against the same tensor slice in one of
        the versions ``have`` (versions of the same model and profile; unknown ones are ignored)."""
        held_versions = tuple(sorted(v for v in set(have) if v != target.version))
        key = (f"{target.model}@{target.version}+{target.profile}", held_versions)
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
        held = []
        for version in held_versions:
            try:
                held.append(self.bundle(target.model, version, target.profile)[1])
            except NotFoundError:
                continue  # a version the hub does not know gives no delta base
        # have=(): a device holds pieces it says nothing about; we plan as if it held none of them.
        # A piece that appears twice travels at its first place; the later ones are "have" steps.
        steps: dict[str, PieceStep] = {}
        for f in plan(target, held, have=()).files:
            for s in f.steps:
                steps.setdefault(s.piece_id, s)
        with self._lock:
            self._plans[key] = steps
            while len(self._plans) > 64:
                self._plans.popitem(last=False)
        return steps

    def encoded(self, step: PieceStep) -> Encoded:
        """The piece of ``step`` as sent: its delta against the step's base when that is smaller,
        else raw (zstd / byte planes). Reads verify the stored bytes (IntegrityError if rotten)."""
        key = EncodingKey(step.piece_id, step.base_id if step.action == "delta" else None)
        mine: Future[Encoded] = Future()
        with self._lock:
            hit = self._encoded.get(key)
            if hit is not None:
                self._encoded.move_to_end(key)
            else:
                making = self._making.setdefault(key, mine)
        if hit is not None:
            self.metrics.inc("edgeglm_hub_encode_cache_total", result="hit")
            return hit
        if making is not mine:  # another request is making it: share its one read and encode
            self.metrics.inc("edgeglm_hub_encode_cache_total", result="hit")
            return making.result()
        try:
            encoded = self._make(key, step)
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._making[key]
        mine.set_result(encoded)
        return encoded

    def _make(self, key: EncodingKey, step: PieceStep) -> Encoded:
        """Read ``step``'s encoding from the store, or encode it and store it (one caller per key)."""
        stored = self.store.encoding(key)
        if stored is not None:
            self.metrics.inc("edgeglm_hub_encode_cache_total", result="store")
            return self._remember(key, stored)
        data = self.store.get(step.piece_id)
        encoded = encode_raw(data, dtype=step.dtype)
        made_as = EncodingKey(step.piece_id)
        if key.base_id is not None and self.store.has(key.base_id):
            made_as = key
            delta = encode_delta(data, self.store.get(key.base_id), dtype=step.dtype)
            if len(delta.payload) < len(encoded.payload):
                encoded = delta
        self.metrics.inc("edgeglm_hub_encode_cache_total", result="miss")
        self.store.put_encoding(made_as, encoded)
        return self._remember(key, encoded)

    def _remember(self, key: EncodingKey, encoded: Encoded) -> Encoded:
        with self._lock:
            if key not in self._encoded:
                self._encoded[key] = encoded
                self._cached += len(encoded.payload)
            while self._cached > self.cache_bytes and len(self._encoded) > 1:
                _, old = self._encoded.popitem(last=False)
                self._cached -= len(old.payload)
        return encoded
