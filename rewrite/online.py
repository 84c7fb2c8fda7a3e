"""Online rewriting stages: encode → global retrieval → personal retrieval → rerank → trigger.

The stages share one :class:`OnlineLayer` (held by :class:`~rewrite.pipeline.Resources`): the
DPR query encoder (:class:`rewrite.encoder.QueryEncoder`: ONNX Runtime, or numpy for a static
tower) and the FAISS global index (:class:`rewrite.retrieval.GlobalIndex`) of one published
version, the personal store (:class:`rewrite.personal.PersonalStore`) and the ranker
(:func:`rewrite.rerank.load_ranker`).

**Versions never mix inside the online layer.** The nightly job records ``index_dir`` and
``encoder_id`` in ``qrw:{version}:meta``; the layer loads that index with the query encoder
whose artifact folder is named by that ``encoder_id`` (``dpr.artifacts_dir/<encoder_id>``), and
the personal histories are read from the same version. When ``qrw:active`` moves, the new
version's index is loaded in a background thread while requests keep using the complete
previous snapshot; an index that is missing, corrupt or built with another encoder is refused
(logged, counted in ``qrw_online_index_errors_total``) and the previous snapshot stays in use.
With no snapshot at all (nothing published with an index yet), or when the active version was
published without an index, the online stages pass through (``reason="online_unavailable"``).

Design: the online path of Ponnusamy et al. (2020/2022, Alexa self-learning) — DPR retrieval
(Karpukhin et al., EMNLP 2020) with a global and a personal layer, then a learning-to-rank
reranker and a precision-oriented trigger.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter

from rewrite import keyspace, libc, metrics
from rewrite.config import Settings
from rewrite.encoder import QueryEncoder
from rewrite.personal import UNKNOWN_ROW, PersonalHistory, PersonalStore
from rewrite.pipeline import Resources, RewriteState, register_stage
from rewrite.rerank import (
    FEATURE_NAMES,
    CandidateRanker,
    feature_matrices,
    load_ranker,
    succeeds_for_user,
    trigger,
)
from rewrite.retrieval import GlobalIndex, RetrievedCandidate, verify_index_dir
from rewrite.store import StoreUnavailableError
from rewrite.types import Candidate

log = logging.getLogger(__name__)

INDEX_ERRORS = Counter(
    "qrw_online_index_errors_total", "Published indexes the service refused to load"
)
INDEX_LOADS = Counter("qrw_online_index_loads_total", "Published indexes loaded")


@dataclass(frozen=True)
class OnlineSnapshot:
    """A consistent online model: one version's index with its matching query encoder."""

    version: str
    index: GlobalIndex
    encoder: QueryEncoder


def return_freed_memory() -> None:
    """Hand memory that a dropped index freed back to the OS: the Arrow memory pool's cached
    pages (pyarrow ``MemoryPool.release_unused``) and glibc's free lists (``malloc_trim(0)``;
    skipped on other C libraries). Without it a process keeps the old version's ~300-500 MB
    (1M entries) as free heap after a swap: measured in process, a dropped 1M-entry index
    left RSS at 362 MB, 271 after the Arrow pool's release and 163 after ``malloc_trim``
    (65 before loading; ~10 ms)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc.malloc_trim()


@contextlib.contextmanager
def index_swap_lock(path: Path | None) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing; None = no lock).

    ``service.index_swap_lock``: the service processes of one host (:mod:`rewrite.processes`
    sets it) take it around loading a version's index, so they load and swap one at a time:
    with N processes the memory peak of a publish is one extra index (not N), and under
    ``index_swap: release_first`` one process at a time passes the online layer through.
    Blocks until the lock is free (another process's load: seconds).

    Raises:
        OSError: the lock file cannot be opened.
    """
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a+b") as fh:
        started = time.monotonic()
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        waited = time.monotonic() - started
        if waited > 0.05:
            log.info("waited %.1f s for the index swap lock %s", waited, path)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _when_dropped(index: GlobalIndex) -> None:
    """Return the memory of ``index`` (:func:`return_freed_memory`) once it is collected —
    when the last in-flight request holding its snapshot finishes — on a short-lived thread,
    so no request waits for the trim."""
    weakref.finalize(
        index,
        lambda: threading.Thread(
            target=return_freed_memory, name="qrw-return-memory", daemon=True
        ).start(),
    )


class OnlineLayer:
    """Loads and swaps the online snapshot of the active version; owns personal store + ranker.

    Args:
        settings: loaded settings (``dpr``, ``rerank``, ``catalog``, ``redis``).
        redis_client: a redis-py client (``decode_responses=True``) used to read version meta.
        active_version: callable returning the active version id (cached by the pair store).

    ``warm_up()`` loads the ranker, opens the personal store and loads the active version's
    snapshot synchronously (if one is published); later version changes load in background.
    """

    def __init__(self, settings: Settings, redis_client: Any, active_version: Any) -> None:
        self.settings = settings
        self._redis = redis_client
        self._active_version = active_version
        self._snapshot: OnlineSnapshot | None = None
        self._encoders: dict[str, QueryEncoder] = {}
        self._tried: set[str] = set()  # versions whose index load was attempted
        # version -> (index_dir, encoder_id), or None when published without an online index
        self._index_meta: dict[str, tuple[str, str] | None] = {}
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()
        self.personal: PersonalStore | None = None
        self.ranker: CandidateRanker | None = None
        self._warm = False

    def warm_up(self) -> None:
        """Load ranker, personal store and the active version's snapshot (idempotent)."""
        if self._warm:
            return
        self.ranker = load_ranker(self.settings.rerank)
        self.personal = PersonalStore.from_settings(self.settings)
        try:
            version = self._active_version()
        except StoreUnavailableError:
            version = None
        if version:
            self._load(version)
        self._warm = True

    def _encoder(self, encoder_id: str) -> QueryEncoder:
        enc = self._encoders.get(encoder_id)
        if enc is None:
            path = Path(self.settings.dpr.artifacts_dir) / encoder_id
            precision = self.settings.dpr.query_precision
            enc = QueryEncoder.load(
                path,
                threads=self.settings.dpr.threads,
                quantized=None if precision == "auto" else precision == "int8",
                cache_size=self.settings.dpr.query_cache_size,
            )
            if enc.encoder_id != encoder_id:
                raise ValueError(
                    f"DPR artifact {path} has encoder_id {enc.encoder_id}, expected {encoder_id}"
                )
            self._encoders[encoder_id] = enc
        return enc

    def _index_of(self, version: str) -> tuple[str, str] | None:
        """``(index_dir, encoder_id)`` from the version's meta (one HGETALL per version, then
        remembered), or None when the version was published without an online index.

        Raises:
            redis.RedisError / OSError: Redis failed (nothing is remembered).
        """
        if version in self._index_meta:
            return self._index_meta[version]
        meta = self._redis.hgetall(keyspace.meta_key(version))
        index_dir, encoder_id = meta.get("index_dir"), meta.get("encoder_id")
        found = (str(index_dir), str(encoder_id)) if index_dir and encoder_id else None
        if found is None:
            log.info("version %s has no online index; the online layer is off", version)
        with self._lock:
            self._index_meta[version] = found
        return found

    def _load_index(self, index_dir: Path, encoder_id: str, verify: bool = True) -> GlobalIndex:
        return GlobalIndex.load(
            index_dir,
            expected_encoder_id=encoder_id,
            ef_search=self.settings.dpr.hnsw_ef_search,
            nprobe=self.settings.dpr.ivf_nprobe,
            refine_k_factor=self.settings.dpr.ivf_refine_k_factor,
            mmap=self.settings.dpr.index_mmap,
            verify=verify,
            threads=self.settings.dpr.threads,
        )

    def _load(self, version: str) -> None:
        """Load ``version``'s index + encoder; on failure keep the current snapshot.

        ``service.index_swap``: ``overlap`` loads the new index while the current snapshot
        keeps answering (two indexes resident for a moment); ``release_first`` checks the new
        folder without loading it (checksums, encoder), then drops the current snapshot (the
        online layer passes through, ``online_unavailable``, while the new one loads) and loads
        — one index resident at a time; if that load still fails, the old version's folder is
        loaded again.
        """
        with self._lock:
            if version in self._tried:
                return
            self._tried.add(version)
        with index_swap_lock(self.settings.service.index_swap_lock):
            self._swap(version)

    def _swap(self, version: str) -> None:
        """The body of :meth:`_load` (under the swap lock)."""
        previous: tuple[str, Path, str] | None = None
        try:
            found = self._index_of(version)
            if found is None:
                return
            index_dir, encoder_id = found
            encoder = self._encoder(encoder_id)
            current = self._snapshot
            release = False
            if self.settings.service.index_swap == "release_first" and current is not None:
                release = True
                verify_index_dir(Path(index_dir), encoder_id)  # refuse before letting go
                previous = (current.version, current.index.directory, current.encoder.encoder_id)
                _when_dropped(current.index)
                with self._lock:
                    self._snapshot = None
                del current  # in-flight requests hold the old snapshot until they finish
                log.info("released the online snapshot of %s to load %s", previous[0], version)
            index = self._load_index(Path(index_dir), encoder_id, verify=not release)
        except Exception as err:  # refuse anything that fails to load; keep serving the old one
            INDEX_ERRORS.inc()
            log.error("refusing the online index of version %s: %s", version, err)
            if previous is not None:
                self._restore(*previous)
            return
        self._prefetch_user_filter(version)
        with self._lock:
            old, self._snapshot = self._snapshot, OnlineSnapshot(version, index, encoder)
        if old is not None:
            _when_dropped(old.index)
            del old
        INDEX_LOADS.inc()
        log.info("online layer now serves version %s (%d catalog entries)", version, len(index))

    def _prefetch_user_filter(self, version: str) -> None:
        """Read the version's filter of users with a history before its snapshot serves, so
        the first micro-batch after a flip does not wait for it (8 MB at 1M users, several
        ``GETRANGE`` round trips); a Redis failure leaves it to the first request."""
        if self.personal is None:
            return
        try:
            self.personal.user_filter(version)
        except StoreUnavailableError:
            log.warning("filter of users with a history of %s not prefetched", version)

    def _restore(self, version: str, index_dir: Path, encoder_id: str) -> None:
        """Load a released snapshot again after its successor failed to load
        (``release_first``); logged and counted when that fails too."""
        try:
            index = self._load_index(index_dir, encoder_id)
        except Exception as err:
            INDEX_ERRORS.inc()
            log.error("cannot restore the online index of version %s: %s", version, err)
            return
        with self._lock:
            if self._snapshot is None:
                self._snapshot = OnlineSnapshot(version, index, self._encoder(encoder_id))
        log.warning("online layer serves version %s again", version)

    def snapshot(self) -> OnlineSnapshot | None:
        """The snapshot to answer with; starts a background load when the active version moved.

        The new version's meta is read at once (one HGETALL per version): a version published
        without an index turns the online layer off immediately; an index is loaded in the
        background while the previous snapshot keeps answering. Never raises (a Redis failure
        keeps the current snapshot).
        """
        current = self._snapshot
        try:
            version = self._active_version()
        except StoreUnavailableError:
            return current
        if not version or (current is not None and current.version == version):
            return current
        try:
            found = self._index_of(version)
        except Exception as err:  # Redis trouble: keep answering with what we have
            log.warning("cannot read the meta of version %s: %s", version, err)
            return current
        if found is None:
            return None  # the active version deliberately has no online layer
        with self._lock:
            busy = self._loading is not None and self._loading.is_alive()
            if not busy and version not in self._tried:
                self._loading = threading.Thread(
                    target=self._load, args=(version,), name="qrw-index-load", daemon=True
                )
                self._loading.start()
        return current

    def wait_loaded(self, timeout_s: float = 30.0) -> None:
        """Block until a background load finishes (tests, benchmarks)."""
        t = self._loading
        if t is not None:
            t.join(timeout_s)


def merge_personal(
    global_cands: Sequence[RetrievedCandidate],
    texts: Sequence[str],
    counts: np.ndarray,
    ages_s: np.ndarray,
    scores: np.ndarray,
    k: int,
    lookup: Callable[[Sequence[str]], Sequence[RetrievedCandidate | None]],
) -> list[RetrievedCandidate]:
    """Merge the user's top-``k`` history entries into the global candidates, by text
    (:func:`merge_personal_top` of the ``k`` highest ``scores``, equal scores in entry order).

    Args:
        global_cands: the global layer's candidates (best first).
        texts, counts: the user's history (``(n,)`` successful uses).
        ages_s: ``(n,)`` seconds since the user last used each entry (:func:`history_ages`);
            negative = unknown (becomes ``personal_age_s`` -1).
        scores: ``(n,)`` scores of the history entries against the query (dense, or any
            similarity; only their order matters here).
        k: personal candidates kept (highest scores).
        lookup: as :func:`merge_personal_top`.

    Returns:
        As :func:`merge_personal_top`.
    """
    s = np.asarray(scores)
    top = np.argsort(-s, kind="stable")[: max(k, 0)]
    return merge_personal_top(global_cands, texts, counts, ages_s, top, s[top], lookup)


def merge_personal_top(
    global_cands: Sequence[RetrievedCandidate],
    texts: Sequence[str],
    counts: np.ndarray,
    ages_s: np.ndarray,
    top: np.ndarray,
    top_scores: np.ndarray,
    lookup: Callable[[Sequence[str]], Sequence[RetrievedCandidate | None]],
) -> list[RetrievedCandidate]:
    """Merge chosen history entries into the global candidates, by text.

    Args:
        global_cands: the global layer's candidates (best first).
        texts, counts: the user's history (``(n,)`` successful uses).
        ages_s: ``(n,)`` seconds since the user last used each entry (:func:`history_ages`);
            negative = unknown (becomes ``personal_age_s`` -1).
        top: ``(m,)`` int positions of the entries to merge, best first
            (:meth:`rewrite.personal.PersonalHistory.top`).
        top_scores: ``(m,)`` their scores against the query (each candidate's
            ``dense_score``).
        lookup: catalog metadata of texts, None for a text outside the catalog (one call
            for all the history entries the global layer did not return;
            :meth:`rewrite.retrieval.GlobalIndex.lookup_many`).

    Returns:
        Global candidates with the personal ones merged in: an utterance found by both layers
        becomes one candidate with ``layer="personal"``, the global metadata kept; a history
        entry the global layer did not return gets its catalog metadata from ``lookup``.
    """
    by_text = {c.text: c for c in global_cands}
    chosen = np.asarray(top, dtype=np.int64).tolist()
    unseen = [texts[i] for i in chosen if texts[i] not in by_text]
    looked_up = dict(zip(unseen, lookup(unseen), strict=True)) if unseen else {}
    for i, score in zip(chosen, np.asarray(top_scores).tolist(), strict=True):
        text = texts[i]
        g = by_text.get(text) or looked_up.get(text)
        age = float(ages_s[i])
        by_text[text] = RetrievedCandidate(
            text=text,
            layer="personal",
            dense_score=float(score),
            frequency=g.frequency if g else 0,
            success_rate=g.success_rate if g else 0.0,
            n_users=g.n_users if g else 0,
            personal_count=int(counts[i]),
            personal_age_s=age if age >= 0 else -1.0,
            domain=g.domain if g else "",
            intent=g.intent if g else "",
            device_types=g.device_types if g else (),
            catalog_row=g.catalog_row if g else -1,
        )
    return list(by_text.values())


def history_lookup(
    hist: PersonalHistory, index: GlobalIndex, positions: Sequence[int]
) -> Callable[[Sequence[str]], list[RetrievedCandidate | None]]:
    """The ``lookup`` of :func:`merge_personal_top` for one user's history: catalog metadata of
    history texts from ``index`` (device types and NLU labels left in the index, as the
    global search leaves them), each entry's catalog row remembered in
    ``hist.catalog_rows``: a history served from the personal cache pays the catalog's hash
    search (~40-60 us for a request's entries with the caches cold) once per entry, not on
    every request, and then only the metadata gather (:meth:`GlobalIndex.candidates_at`).

    Args:
        hist: the history (of ``index``'s version: the personal stage reads histories of its
            snapshot's version).
        index: the global index of that version.
        positions: the history entries the lookup may be asked about (the chosen top-k);
            their texts map to their memo slots.

    Raises:
        KeyError: (from the returned function) a text that is not the text of one of
            ``positions``.
    """
    slot = {hist.texts[i]: i for i in positions}
    memo = hist.catalog_rows

    def lookup(texts: Sequence[str]) -> list[RetrievedCandidate | None]:
        at = np.asarray([slot[t] for t in texts], dtype=np.int64)
        rows = memo[at]
        todo = np.flatnonzero(rows == UNKNOWN_ROW)
        if len(todo):
            rows[todo] = index.rows_of([texts[i] for i in todo.tolist()])
            memo[at[todo]] = rows[todo]
        return index.candidates_at(rows, device_types=False, nlu_labels=False)

    return lookup


def history_ages(last_seen: np.ndarray, now_s: float) -> np.ndarray:
    """Seconds since each last use, ``(n,)`` float64, clamped at 0 (a ``last_seen`` after
    ``now_s``, i.e. clock skew between the job's logs and the service, counts as "just now")."""
    return np.maximum(0.0, now_s - np.asarray(last_seen, dtype=np.float64))


def _online(resources: Resources) -> OnlineLayer:
    """The shared :class:`OnlineLayer` of these resources (created on first use)."""
    layer = resources.online
    if layer is None:
        store = resources.pair_store
        if store is None or not hasattr(store, "client"):
            raise RuntimeError("online stages need the Redis pair store (redis)")
        layer = OnlineLayer(resources.settings, store.client, store.active_version)
        resources.online = layer
    assert isinstance(layer, OnlineLayer)
    return layer


#: Arm layers served by the online stages (an arm with neither stops after ``precomputed``).
_ONLINE_LAYERS = frozenset({"global", "personal"})


class _OnlineStage:
    """Shared shape of the online stages: light ``__init__`` (keeps the resources), heavy
    ``warm_up`` (the shared :class:`OnlineLayer`)."""

    name = "online"
    offload = True  # ONNX Runtime, FAISS, Redis, LightGBM: mostly outside the GIL

    def __init__(self, resources: Resources) -> None:
        self._resources = resources

    def warm_up(self) -> None:
        _online(self._resources).warm_up()


class _BatchedOnlineStage(_OnlineStage):
    """An online stage whose work is written once, for a micro-batch (``run_batch``); one
    request is a batch of one."""

    def run(self, state: RewriteState) -> RewriteState:
        self.run_batch([state])
        return state

    def run_batch(self, states: Sequence[RewriteState]) -> None:
        raise NotImplementedError


class CatalogGateStage(_OnlineStage):
    """End a request that :func:`rewrite.rerank.trigger` would never rewrite before any online
    work, when that is known for free: the query is itself an entry of the global catalog
    (it historically succeeds for many users: ``succeeds_globally``), or — with the personal
    layer in the request's arm — the user's history, already in the in-process cache, holds
    it at least ``catalog.personal_min_count`` times (``already_succeeds``;
    :meth:`rewrite.personal.PersonalStore.cached_history`, no Redis read). Encoding such a
    query, searching FAISS, reading the history and scoring candidates (~1.5 ms of CPU a
    request at 1M entries) would only confirm a pass-through. One hash search of the
    snapshot's catalog (:meth:`rewrite.retrieval.GlobalIndex.__contains__`) and at most one
    cache look-up, on the event loop like the precomputed lookup (``offload = False``): a
    working head query, most of an assistant's traffic, is answered without a hand-over to
    the online workers.

    Passes untouched: a request with ``explain`` (its response lists the candidates with their
    features, so it runs the online stages and ends at the trigger as before), one whose arm
    has no online layer, and any request while no index is published (the encode stage
    answers those). The decision is the trigger's; only its reason can differ when more than
    one applies (the trigger checks ``no_candidates``, then ``already_succeeds``, then
    ``succeeds_globally``; the gate the catalog first).
    """

    name = "catalog_gate"
    offload = False  # a hash search and a cache look-up: cheaper than the hand-over

    def run(self, state: RewriteState) -> RewriteState:
        if state.request.explain or not state.layers & _ONLINE_LAYERS:
            return state
        layer = _online(self._resources)
        snap = layer.snapshot()
        if snap is None:
            return state
        if state.normalized in snap.index:
            state.reason = "succeeds_globally"
        elif "personal" in state.layers and layer.personal is not None:
            hist = layer.personal.cached_history(state.request.user_id, snap.version)
            least = self._resources.settings.catalog.personal_min_count
            if hist is None or not succeeds_for_user(hist.count_of(state.normalized), least):
                state.personal_history = hist  # the personal stage need not look again
                return state
            state.reason = "already_succeeds"
        else:
            return state
        state.done, state.model_version = True, snap.version
        return state


class EncodeStage(_BatchedOnlineStage):
    """Query vector of the normalized utterance (DPR query tower, ONNX Runtime).

    Sets ``state.online`` (the snapshot) and ``state.query_vector`` ((dim,) float32,
    L2-normalised); passes through with ``reason="online_unavailable"`` when no online index
    is published. A micro-batch (:meth:`run_batch`) is answered by one snapshot and one pass
    through the query-vector cache; the utterances not in it are encoded one per call by a
    transformer tower, all in one call by a static one
    (:meth:`rewrite.encoder.QueryEncoder.encode_cached`).
    """

    name = "encode"

    def run_batch(self, states: Sequence[RewriteState]) -> None:
        todo = []
        for state in states:
            if state.layers & _ONLINE_LAYERS:
                todo.append(state)
            else:
                state.reason, state.done = "arm_without_online_layers", True
        if not todo:
            return
        snap = _online(self._resources).snapshot()
        if snap is None:
            for state in todo:
                state.reason, state.done = "online_unavailable", True
            return
        vecs = snap.encoder.encode_cached([state.normalized for state in todo])
        for state, vec in zip(todo, vecs, strict=True):
            state.online, state.query_vector = snap, vec


class GlobalRetrievalStage(_BatchedOnlineStage):
    """Top ``dpr.top_k`` catalog entries by inner product from the snapshot's FAISS index
    (a micro-batch: one ``search`` call with ``(b, dim)`` queries and their normalized texts
    per snapshot; the texts feed the index's lexical channel, :mod:`rewrite.lexical`)."""

    name = "global_retrieval"

    def run_batch(self, states: Sequence[RewriteState]) -> None:
        k = self._resources.settings.dpr.top_k
        by_snapshot: dict[int, list[RewriteState]] = {}
        for state in states:
            assert isinstance(state.online, OnlineSnapshot) and state.query_vector is not None
            if "global" in state.layers:
                by_snapshot.setdefault(id(state.online), []).append(state)
        for group in by_snapshot.values():
            queries = np.stack([state.query_vector for state in group])  # type: ignore[misc]
            # device-type counts stay in the index (the ranker reads them from there), and so
            # do domain and intent (nothing online reads them)
            found = group[0].online.index.search(
                queries,
                k,
                device_types=False,
                texts=[state.normalized for state in group],
                nlu_labels=False,
            )
            for state, cands in zip(group, found, strict=True):
                state.retrieved = list(cands)


class PersonalRetrievalStage(_BatchedOnlineStage):
    """The user's own successful history (same version), scored exactly, merged with global.

    Reads the users' hashes (:meth:`rewrite.personal.PersonalStore.histories`: a micro-batch
    in at most one Redis round trip, none for users the cache or the version's user filter
    answers), searches each history's float16 vectors exactly for its query vector's top
    ``rerank.personal_top_k`` (:meth:`rewrite.personal.PersonalHistory.top`), and merges by
    text: an utterance found by both layers becomes one candidate with ``layer="personal"``
    and the global metadata kept. Also records how often the query itself succeeded for this user
    (``state.user_success_count``; the trigger never rewrites those). A Redis failure passes
    the requests that needed it through (``reason="store_unavailable"``).
    """

    name = "personal_retrieval"

    def run_batch(self, states: Sequence[RewriteState]) -> None:
        layer = _online(self._resources)
        assert layer.personal is not None
        by_snapshot: dict[int, list[RewriteState]] = {}
        for state in states:
            assert isinstance(state.online, OnlineSnapshot)
            if "personal" in state.layers:
                by_snapshot.setdefault(id(state.online), []).append(state)
        top_k = self._resources.settings.rerank.personal_top_k
        now = time.time()
        for group in by_snapshot.values():
            snap = group[0].online
            assert isinstance(snap, OnlineSnapshot)
            # the catalog gate may have found the history in the cache already (same version)
            hists: list[PersonalHistory | None] = [
                h if h is not None and h.version == snap.version else None
                for h in (state.personal_history for state in group)
            ]
            todo = [i for i, h in enumerate(hists) if h is None]
            try:
                if todo:
                    read = layer.personal.histories(
                        [group[i].request.user_id for i in todo], version=snap.version
                    )
                    for i, h in zip(todo, read, strict=True):
                        hists[i] = h
            except StoreUnavailableError:
                metrics.STORE_ERRORS.inc(len(group))
                for state in group:
                    state.reason, state.done = "store_unavailable", True
                continue
            for state, hist in zip(group, hists, strict=True):
                assert hist is not None
                state.user_success_count = hist.count_of(state.normalized)
                if not len(hist) or hist.scorer is None or state.query_vector is None:
                    continue
                top, top_scores = hist.top(state.query_vector, top_k)
                state.retrieved = merge_personal_top(
                    state.retrieved,
                    hist.texts,
                    hist.counts,
                    history_ages(hist.last_seen, now),
                    top,
                    top_scores,
                    history_lookup(hist, snap.index, top.tolist()),
                )


class RerankStage(_BatchedOnlineStage):
    """Orders ``state.retrieved`` with the ranker (LightGBM lambdarank, or the heuristic one).

    Sets ``state.scores`` ((n,) float64, best first) and ``state.decision_score``; with
    ``explain`` every candidate is returned with its features and score. A micro-batch
    (:meth:`run_batch`) is featurised in one pass (:func:`rewrite.rerank.feature_matrices`)
    and scored with one ranker call and one trigger-model call.
    """

    name = "rerank"

    def run_batch(self, states: Sequence[RewriteState]) -> None:
        ranker = _online(self._resources).ranker
        assert ranker is not None
        todo = [state for state in states if state.retrieved]
        for state in states:
            if not state.retrieved:
                state.scores = np.zeros(0)
        if not todo:
            return
        x, offsets = feature_matrices(
            [(s.normalized, s.retrieved, s.request.context, s.device_type) for s in todo],
            [s.online.index if isinstance(s.online, OnlineSnapshot) else None for s in todo],
        )
        scores = ranker.score_matrix(x)
        orders = [
            np.argsort(-scores[lo:hi], kind="stable") + lo
            for lo, hi in itertools.pairwise(offsets.tolist())
        ]
        decisions = ranker.decision_scores(
            x[[order[0] for order in orders]], [scores[order] for order in orders]
        )
        # assigned only now: a failure above leaves the states with candidates as they were
        for state, order, lo, decision in zip(
            todo, orders, offsets[:-1].tolist(), decisions.tolist(), strict=True
        ):
            cands = state.retrieved
            state.retrieved = [cands[i - lo] for i in order.tolist()]
            state.scores = scores[order]
            state.decision_score = float(decision)
            if state.request.explain:
                for rank, i in enumerate(order.tolist()):
                    feats = {n: float(v) for n, v in zip(FEATURE_NAMES, x[i].tolist(), strict=True)}
                    c = cands[i - lo]
                    state.candidates.append(
                        Candidate(c.text, c.layer, float(state.scores[rank]), feats)
                    )


class TriggerStage(_OnlineStage):
    """Rewrite with the top candidate only when :func:`rewrite.rerank.trigger` says so."""

    name = "trigger"

    def run(self, state: RewriteState) -> RewriteState:
        ranker = _online(self._resources).ranker
        assert ranker is not None
        best = state.retrieved[0] if state.retrieved else None
        best_score = state.decision_score if best is not None and len(state.scores) else 0.0
        snap = state.online
        in_catalog = isinstance(snap, OnlineSnapshot) and state.normalized in snap.index
        decision = trigger(
            state.normalized,
            best.text if best else None,
            best_score,
            ranker.trigger_threshold,
            state.user_success_count,
            self._resources.settings.catalog.personal_min_count,
            query_in_catalog=in_catalog,
        )
        if isinstance(snap, OnlineSnapshot):
            state.model_version = snap.version
        if decision.rewrite and best is not None:
            state.rewrite, state.source = best.text, best.layer
            state.confidence = ranker.confidence(best_score)
            state.reason = ""
        else:
            state.reason = decision.reason
        state.done = True
        return state


register_stage("catalog_gate", CatalogGateStage)
register_stage("encode", EncodeStage)
register_stage("global_retrieval", GlobalRetrievalStage)
register_stage("personal_retrieval", PersonalRetrievalStage)
register_stage("rerank", RerankStage)
register_stage("trigger", TriggerStage)
