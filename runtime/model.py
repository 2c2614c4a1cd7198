"""One model of a bundle on onnxruntime, with its fixed-size KV buffer.

The buffer is allocated once at load (`max_context` slots per layer) and bound to the session
with IO binding as both past and present, so GroupQueryAttention writes each chunk's K/V in
place. `length` is the write index: everything below it is valid, rollback is assigning it.

The runner also keeps `tokens`, the ids whose K/V fill slots 0..length-1. The buffer is shared by every
conversation on an engine, so a caller never trusts `length` alone: it asks `common_prefix` how much of
its own text the buffer holds and feeds the rest (runtime/decoding.py `catch_up`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgespec.runtime import cache
from edgespec.runtime.bundle import BundleError, GraphInfo, Manifest, ModelInfo

UNLISTED = -1e30  # logit of a token outside a restricted draft head


class ContextFullError(RuntimeError):
    """A pass would write past the end of the fixed-size KV buffer."""


@dataclass
class PassStats:
    passes: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def record(self, chunk: int, seconds: float) -> None:
        self.passes += 1
        self.tokens += chunk
        self.seconds += seconds


def physical_cores() -> int:
    """Physical core count from /proc/cpuinfo (hyperthreads slow onnxruntime's matmuls); else os.cpu_count()."""
    try:
        pairs = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
            elif not line.strip() and core is not None:
                pairs.add((phys, core))
                phys = core = None
        if core is not None:
            pairs.add((phys, core))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


@dataclass
class SessionConfig:
    threads: int | None = None  # None: physical cores
    optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    cache_optimized: bool = True
    stop_spinning: bool = True  # False only where one session runs alone (a bundle without a draft)

    def __post_init__(self) -> None:
        """More threads than logical CPUs only slow a pass down, and a huge count spends minutes creating them."""
        most = os.cpu_count() or 1
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= most):
            raise ValueError(f"threads must be an integer from 1 to {most} (this machine's logical CPUs), "
                             f"got {self.threads!r}")

    def session_options(self) -> ort.SessionOptions:
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if self.optimization not in levels:
            raise ValueError(f"optimization must be one of {', '.join(levels)}, got {self.optimization!r}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads or physical_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = levels[self.optimization]
        so.log_severity_level = 3
        # Workers spin within a pass (fast hand-offs) but stop when it returns. Each session has its own
        # pool, and on a 2-core CPU a pool still spinning after its pass takes a core from the next
        # model's pass, so a target and a draft that alternate both stop spinning (measured faster than
        # either keeping its spin). A session that runs alone keeps spinning: waking a stopped pool adds
        # to every one-row pass on some CPUs (docs/speculative.md).
        if self.stop_spinning:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        return so


def open_graph_session(manifest: Manifest, graph_file: str, config: SessionConfig,
                       providers: list | None = None) -> tuple[ort.InferenceSession, dict]:
    """Open a graph, reusing its optimized copy in the bundle cache (runtime/cache.py) when a valid one exists.

    The key holds the graph's checksum, the onnxruntime version, the optimization level and the providers, so a
    re-export or an upgrade never reads a stale graph; the copy's digests are written after it, so an interrupted
    first load or a damaged copy is optimized again rather than loaded.
    """
    providers = providers or ["CPUExecutionProvider"]
    source = manifest.path(graph_file)
    provider_tag = "-".join(p if isinstance(p, str) else p[0] for p in providers)
    name = graph_file.removesuffix(".onnx").replace("/", "_")
    key = cache.CacheKey("optimized", (name, manifest.files.get(graph_file, "nochecksum")[:16],
                                       f"ort{ort.__version__}", config.optimization, provider_tag))
    info = {"graph": graph_file, "cache": "off"}
    t0 = time.perf_counter()
    cached = cache.verified_graph(manifest.root, key) if config.cache_optimized else None
    if cached is not None:
        so = config.session_options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            sess = ort.InferenceSession(str(cached), so, providers=providers)
            return sess, info | {"cache": "hit", "load_seconds": time.perf_counter() - t0,
                                 "providers": sess.get_providers()}
        except Exception:  # a copy onnxruntime cannot read is rebuilt from the checksummed source below
            cached.unlink(missing_ok=True)
    target = cache.graph_target(manifest.root, key) if config.cache_optimized else None
    sess = _optimize_into(source, graph_file, config, providers, target) if target is not None else None
    if sess is not None:
        info["cache"] = "written"
    else:
        sess = _session(source, graph_file, config.session_options(), providers)
    info["load_seconds"] = time.perf_counter() - t0
    info["providers"] = sess.get_providers()
    return sess, info


def _optimize_into(source: Path, graph_file: str, config: SessionConfig, providers: list,
                   target: Path) -> ort.InferenceSession | None:
    """A session over `source` that also saves onnxruntime's optimized graph as `target` (sealed with its digests),
    or None when saving fails (e.g. an optimized graph over protobuf's 2 GB limit: run without a cache)."""
    target.parent.mkdir(exist_ok=True)
    cache.remove_dead_temporaries(target.parent)
    tmp = cache.temporary_name(target, ".onnx")
    so = config.session_options()
    so.optimized_model_filepath = str(tmp)
    # Initializers go to a data file named after the final graph; the graph is renamed into place, then sealed.
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", cache.weights_name(target))
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        sess = _session(source, graph_file, so, providers)
        os.replace(tmp, target)
        cache.seal_graph(target)
        return sess
    except BundleError:
        raise
    except Exception:
        tmp.unlink(missing_ok=True)
        return None


def _session(source: Path, graph_file: str, so: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    """An onnxruntime session over `source`; a graph onnxruntime cannot read (truncated, not ONNX, its weights
    missing) is a BundleError naming the file, not onnxruntime's own exception type."""
    try:
        return ort.InferenceSession(str(source), so, providers=providers)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"onnxruntime cannot open {graph_file}: {first}") from exc


def check_interface(info: ModelInfo, max_context: int, sessions: list[tuple[GraphInfo, ort.InferenceSession]]) -> None:
    """Each graph takes the K/V buffer and gives the logits the manifest describes. A manifest whose shapes
    disagree with its graphs (another model's manifest, an edited max_context) is refused here, before the
    buffer is allocated, instead of failing inside onnxruntime at the first pass."""
    kv = [1, info.num_kv_heads, max_context, info.head_dim]
    columns = info.vocab_size if info.head_ids is None else len(info.head_ids)
    for graph, session in sessions:
        inputs = {i.name: i.shape for i in session.get_inputs()}
        found = {name for name in inputs if name.startswith(("past_key.", "past_value."))}
        names = {f"past_{kind}.{layer}" for layer in range(len(found) // 2) for kind in ("key", "value")}
        if len(found) != 2 * info.num_layers or found != names:  # counted, not listed: a manifest may say 10**12
            raise BundleError(f"{graph.file} takes K/V for {len(found) // 2} layers but the manifest's {info.role} "
                              f"has {info.num_layers}: the manifest does not describe this graph")
        for name in sorted(names):
            if not _fits(inputs[name], kv):
                raise BundleError(f"{graph.file} takes {name} of shape {inputs[name]} but the manifest describes "
                                  f"{kv} (max_context {max_context}): the manifest does not describe this graph")
        _check_names(graph, set(inputs), {o.name for o in session.get_outputs()}, names)
        logits = next((o.shape for o in session.get_outputs() if o.name == "logits"), None)
        if logits is None or not _fits(logits[-1:], [columns]):
            raise BundleError(f"{graph.file} gives logits of shape {logits} but the manifest's {info.role} has "
                              f"{columns} of them per row: the manifest does not describe this graph")


def _check_names(graph: GraphInfo, inputs: set[str], outputs: set[str], kv: set[str]) -> None:
    """The graph takes exactly the inputs the runner binds and gives the outputs it binds; which ones follow from
    the manifest (`logits_from` among its inputs, a static variant's `new_` K/V instead of `present_`), so a
    manifest that misdescribes them is refused here, not by onnxruntime at the first pass."""
    wanted = {"input_ids", "position_ids", "attention_mask", "past_length", *kv}
    wanted |= {"logits_from"} if graph.tail_logits else set()
    given = {"logits"} | {("new_" if graph.variant == "static" else "present_") + name.removeprefix("past_")
                          for name in kv}
    if inputs != wanted or not given <= outputs:
        wrong = sorted(inputs ^ wanted) or sorted(given - outputs)
        raise BundleError(f"{graph.file} disagrees with the manifest's {graph.variant} graph on {', '.join(wrong)}: "
                          "the manifest does not describe this graph")


def _fits(shape: list, wanted: list[int]) -> bool:
    """A graph's declared shape matches `wanted` wherever it names a fixed size (symbolic sizes match anything)."""
    if len(shape) != len(wanted):
        return False
    return all(not isinstance(d, int) or d == w for d, w in zip(shape, wanted, strict=True))


class _StepInputs:
    """The inputs of a one-token causal pass, preallocated, with OrtValues over their memory.

    A session reads a bound OrtValue's memory when it runs (the KV buffers rely on this too), so a
    one-token pass writes its token, position and past length in place and binds nothing: that
    saves creating, copying and binding four arrays per decoded token. A wider graph (a static
    chunk, or `min_rows`) gets the padding a chunk of one token gets in `forward`: token 0, the
    same position, and a mask in which every row sees only itself.
    """

    def __init__(self, width: int, tail_logits: bool):
        self.ids = np.zeros((1, width), np.int64)
        self.positions = np.zeros((1, width), np.int64)
        self.past_length = np.zeros(1, np.int64)
        arrays = {"input_ids": self.ids, "position_ids": self.positions,
                  "attention_mask": np.eye(width, dtype=bool), "past_length": self.past_length}
        if tail_logits:
            arrays["logits_from"] = np.zeros(1, np.int64)
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}


@dataclass
class _GraphSlot:
    """One session of a model with its IO binding; static graphs also own their new-K/V output arrays.

    `stepping` says the binding holds `step`'s inputs (any longer pass binds its own instead) and
    `logits_width` how many rows of logits output are bound, so a run of one-token passes binds once.
    """

    info: GraphInfo
    session: ort.InferenceSession
    binding: ort.IOBinding
    new_kv: list[np.ndarray] | None
    step: _StepInputs
    stepping: bool = False
    logits_width: int = 0


class ModelRunner:
    """Runs one model over chunks of tokens against its preallocated KV buffer.

    A model has either one fused graph (any chunk length, K/V written in place) or one or more
    static graphs of fixed chunk lengths (for NPUs); each pass uses the smallest graph that fits.
    """

    def __init__(self, info: ModelInfo, max_context: int, sessions: list[tuple[GraphInfo, ort.InferenceSession]],
                 max_chunk: int = 128, load_info: dict | None = None, min_rows: int = 2):
        check_interface(info, max_context, sessions)
        self.info = info
        self.role = info.role
        self.max_context = max_context
        self.vocab_size = info.vocab_size
        self.load_info = load_info or {}
        shape = (1, info.num_kv_heads, max_context, info.head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(info.num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(info.num_layers)]
        # GroupQueryAttention takes a different code path for a one-token pass, and with int8-rounded
        # activations (MatMulNBits accuracy level 4) its tiny differences grow to whole logits. Passes
        # of 2..128 rows agree bit for bit (measured: a 129-row pass computes its last row apart, like a
        # one-row pass), so attention in a fused graph sees at least `min_rows` rows (a padding row
        # whose K/V slot is reserved but never kept) and a pass at most `max_chunk` = 128. That makes a
        # row's logits independent of how many tokens share its pass, which lossless speculation needs.
        # Graphs exported with `attention_rows` pad attention themselves, so the other operators run on
        # the real rows only; older graphs get the padding row as an input row.
        self.min_rows = min_rows if any(g.variant == "fused" for g, _ in sessions) else 1
        # Rows every pass feeds through every operator (the runtime's pass-size check sets 2 on CPUs where
        # a one-row MatMulNBits pass computes apart from wider ones: the padding row is then real input).
        self.input_rows = 1
        kv_values = [ort.OrtValue.ortvalue_from_numpy(a) for pair in zip(self.keys, self.values, strict=True)
                     for a in pair]
        self._slots = sorted((self._bind(g, s, kv_values) for g, s in sessions),
                             key=lambda slot: slot.info.chunk or 1 << 30)
        static = [slot.info.chunk for slot in self._slots if slot.info.variant == "static"]
        self.max_chunk = max(static) if static and len(static) == len(self._slots) else max_chunk
        self._shapes: dict[int, tuple[_GraphSlot, int]] = {}
        self._plan_shapes()
        self._logits = np.zeros((1, self.max_chunk, self.vocab_size), np.float32)
        self._logits_values: dict[int, ort.OrtValue] = {}  # pass width -> OrtValue over its rows of the output
        # A draft with a head over only `head_ids` writes its logits to `_head_logits`; they are spread into
        # `_logits`, whose other columns stay at UNLISTED (probability 0, finite so entropies stay defined).
        self.head_ids = info.head_ids
        self._head_logits = None
        if self.head_ids is not None:
            self._logits.fill(UNLISTED)
            self._head_logits = np.zeros((1, self.max_chunk, len(self.head_ids)), np.float32)
        self.tokens: list[int] = []  # the ids whose K/V are in slots 0..length-1
        self._tree_from: int | None = None  # first slot of a tree pass that `keep` has not settled yet
        self.stats = PassStats()

    @property
    def fused(self) -> bool:
        """One graph for every pass length; a static-shape target (NPU bundles) runs a one-token pass and a
        k-token pass through different graphs, so the pass-size check (runtime/selfcheck.py) may find
        rounding apart between them that capping pass sizes cannot remove."""
        return all(slot.info.variant == "fused" for slot in self._slots)

    @classmethod
    def open(cls, manifest: Manifest, role: str, config: SessionConfig | None = None, graph: str = "fused",
             max_chunk: int = 128) -> ModelRunner:
        """A runner on the default CPU provider for one named graph (export parity, tests, benchmarks)."""
        info = manifest.models[role]
        if graph not in info.graphs:
            raise ValueError(f"{role} model has no {graph!r} graph (has: {', '.join(info.graphs)})")
        session, load_info = open_graph_session(manifest, info.graphs[graph].file, config or SessionConfig())
        return cls(info, manifest.max_context, [(info.graphs[graph], session)], max_chunk, load_info)

    def _bind(self, graph: GraphInfo, session: ort.InferenceSession, kv_values: list) -> _GraphSlot:
        binding = session.io_binding()
        new_kv = None
        if graph.variant == "static":
            new_shape = (1, self.info.num_kv_heads, graph.chunk, self.info.head_dim)
            new_kv = [np.zeros(new_shape, np.float32) for _ in range(2 * self.info.num_layers)]
        for j, value in enumerate(kv_values):
            name = f"{'key' if j % 2 == 0 else 'value'}.{j // 2}"
            binding.bind_ortvalue_input("past_" + name, value)
            if new_kv is None:
                binding.bind_ortvalue_output("present_" + name, value)
            else:
                binding.bind_ortvalue_output("new_" + name, ort.OrtValue.ortvalue_from_numpy(new_kv[j]))
        return _GraphSlot(graph, session, binding, new_kv, _StepInputs(1, graph.tail_logits))

    def _plan_shapes(self) -> None:
        """For each pass length: the smallest graph that fits it and the width the pass runs with there."""
        for slot in self._slots:
            width = self._width(slot.info, 1)
            if len(slot.step.ids[0]) != width:
                slot.step = _StepInputs(width, slot.info.tail_logits)
                slot.stepping = False
        self._shapes = {n: next((slot, self._width(slot.info, n)) for slot in self._slots
                                if slot.info.chunk is None or slot.info.chunk >= n)
                        for n in range(1, self.max_chunk + 1)}

    def pad_passes(self, rows: int) -> None:
        """Feed every pass at least `rows` rows through every operator (1: only what attention needs)."""
        if rows not in (1, 2):
            raise ValueError(f"passes are padded to 1 or 2 rows, not {rows}")
        self.input_rows = rows
        self._plan_shapes()

    def _width(self, graph: GraphInfo, n: int) -> int:
        """Rows a pass of `n` tokens runs with on `graph`: its static chunk, else n padded to `input_rows`,
        and to `min_rows` where the graph does not pad attention itself."""
        if graph.chunk:
            return graph.chunk
        return max(n, self.input_rows, 1 if graph.attention_rows >= self.min_rows else self.min_rows)

    @property
    def providers(self) -> list[str]:
        return self._slots[0].session.get_providers()

    @property
    def kv_bytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    @property
    def length(self) -> int:
        """The write index: slots below it hold the K/V of `tokens`."""
        return len(self.tokens)

    def common_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the buffer holds: their K/V were computed over exactly these ids.

        Rows of a tree pass count only once `keep` has made them a causal path.
        """
        held = self.tokens if self._tree_from is None else self.tokens[:self._tree_from]
        n = min(len(held), len(tokens))
        if held[:n] == tokens[:n]:
            return n
        return next(i for i in range(n) if held[i] != tokens[i])

    @property
    def capacity(self) -> int:
        """Slots still free in the KV buffer."""
        return self.max_context - self.length

    def forward(self, tokens: np.ndarray | list[int], positions: np.ndarray | None = None,
                mask: np.ndarray | None = None, last_rows: int | None = None) -> np.ndarray:
        """Run one pass over `tokens`, writing their K/V at slots length..length+S-1; returns logits [S, V],
        or with `last_rows` those of the last rows only (fewer rows through the LM head, where the graph allows).

        Without `positions`/`mask` the chunk is a causal continuation. The returned array is a view
        into a preallocated buffer, valid until the next call. `length` advances by S; callers that
        keep only part of the chunk call `rollback` or `keep` afterwards.
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = len(tokens)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if n > self.max_chunk:
            raise ValueError(f"chunk of {n} tokens exceeds this runner's max chunk {self.max_chunk}")
        slot, width = self._shapes[n]
        need = n if slot.info.chunk else max(width, self.min_rows)  # a fused pass writes K/V for its padding too
        if self.length + need > self.max_context:
            raise ContextFullError(f"the {self.role} KV buffer holds {self.max_context} tokens; "
                                   f"{self.length} are used and this pass needs {need} more")
        if mask is not None and not slot.info.tree_mask and not np.array_equal(mask, np.tri(n, dtype=bool)):
            raise ValueError(f"the {self.role} graph is causal: it ignores attention_mask and cannot run a tree pass "
                             "(targets verify a path, docs/speculative.md)")
        first = max(0, n - last_rows) if last_rows and slot.info.tail_logits else 0
        if n == 1 and positions is None and mask is None:
            self._bind_step(slot, int(tokens[0]))
        else:
            self._bind_chunk(slot, tokens, positions, mask, width, first)
        rows = width - first  # the logits output holds rows first..width-1 of the pass
        if slot.logits_width != rows:
            slot.binding.bind_ortvalue_output("logits", self._logits_value(rows))
            slot.logits_width = rows
        t0 = time.perf_counter()
        slot.session.run_with_iobinding(slot.binding)
        self.stats.record(n, time.perf_counter() - t0)
        if self._head_logits is not None:
            self._logits[0][:n - first, self.head_ids] = self._head_logits[0, :n - first]
        if slot.new_kv is not None:
            end = self.length + n
            for i in range(len(self.keys)):
                self.keys[i][:, :, self.length:end] = slot.new_kv[2 * i][:, :, :n]
                self.values[i][:, :, self.length:end] = slot.new_kv[2 * i + 1][:, :, :n]
        if positions is not None or mask is not None:  # rows of a tree: not a causal sequence until `keep`
            self._tree_from = self.length if self._tree_from is None else self._tree_from
        self.tokens.extend(tokens.tolist())
        return self._logits[0, :n - first]

    def _bind_step(self, slot: _GraphSlot, token: int) -> None:
        """Write a one-token causal pass into the slot's preallocated inputs (bound once, see _StepInputs)."""
        step = slot.step
        step.ids[0, 0] = token
        step.positions.fill(self.length)
        step.past_length[0] = self.length
        if not slot.stepping:
            for name, value in step.values.items():
                slot.binding.bind_ortvalue_input(name, value)
            slot.stepping = True

    def _bind_chunk(self, slot: _GraphSlot, tokens: np.ndarray, positions: np.ndarray | None,
                    mask: np.ndarray | None, width: int, first: int) -> None:
        """Bind (copies of) a chunk's inputs, padded to `width`; without positions/mask a causal continuation."""
        n = len(tokens)
        if positions is None:
            positions = np.arange(self.length, self.length + n, dtype=np.int64)
        if mask is None:
            mask = np.tri(n, dtype=bool)
        if width != n:  # pad to the static chunk or to min_rows; padded rows see only themselves
            tokens = np.concatenate([tokens, np.zeros(width - n, np.int64)])
            positions = np.concatenate([positions, np.full(width - n, positions[-1], np.int64)])
            padded = np.eye(width, dtype=bool)
            padded[:n, :n] = mask
            mask = padded
        b = slot.binding
        b.bind_cpu_input("input_ids", tokens.reshape(1, width))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64).reshape(1, width))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        b.bind_cpu_input("past_length", np.array([self.length], np.int64))
        if slot.info.tail_logits:
            b.bind_cpu_input("logits_from", np.array([first], np.int64))
        slot.stepping = False

    def _logits_value(self, width: int) -> ort.OrtValue:
        """The OrtValue over the first `width` rows of the logits output (the head's, for a restricted head)."""
        if width not in self._logits_values:
            out = self._logits if self._head_logits is None else self._head_logits
            self._logits_values[width] = ort.OrtValue.ortvalue_from_numpy(out[:, :width])
        return self._logits_values[width]

    def rollback(self, length: int) -> None:
        """Forget every slot at or after `length`: the next pass overwrites them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: {self.length} slots are valid")
        del self.tokens[length:]
        if self._tree_from is not None and length <= self._tree_from:
            self._tree_from = None

    def keep(self, start: int, rows: list[int] | np.ndarray) -> None:
        """After a tree pass that began at slot `start`, keep chunk rows `rows` (in order) as slots start, start+1..."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows[-1] + start >= self.length or np.any(np.diff(rows) <= 0)):
            raise ValueError("rows must be increasing indices into the last chunk")
        src = start + rows
        dst = start + np.arange(len(rows))
        moved = src != dst
        if moved.any():  # a gather of a few rows per layer; the source index is never below the target
            for buf in self.keys + self.values:
                buf[:, :, dst[moved]] = buf[:, :, src[moved]]
        self.tokens[start:] = [self.tokens[i] for i in src]
        self._tree_from = None

    def prefill(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        """Feed tokens in chunks of at most `max_chunk`; returns the logits of the last one."""
        tokens = np.asarray(tokens, dtype=np.int64)
        logits = None
        for i in range(0, len(tokens), self.max_chunk):
            logits = self.forward(tokens[i:i + self.max_chunk], last_rows=1)
        if logits is None:
            raise ValueError("prefill needs at least one token")
        return logits[-1]
