"""Where each model's graphs run: an ordered list of candidate providers per role, and opening a session on them.

`plan` is a pure function of the request, what `detect()` found and which graph variants the bundle
has, so its rules are tested on made-up machines (a phone with QNN, a Mac with CoreML) without
their providers. `open_session` then tries the candidates in order on the real onnxruntime; a
provider that cannot run the graph gives way to the next one with one log line saying why, unless
placement is strict. Target and draft are planned separately, so they may sit on different providers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from edgespec.devices.detect import Available, detect, ep_devices
from edgespec.devices.registry import CPU_PROVIDER, DEVICE_CLASSES, ENTRIES, THREADS, ProviderEntry, entries_for

log = logging.getLogger("edgespec.devices")

ROLES = ("target", "draft")
PARTIAL_OFFLOAD = "fallback to CPU EP has been explicitly disabled"  # onnxruntime's message under strict


class DevicePlacementError(RuntimeError):
    """The requested device cannot run a model and placement is strict (or nothing at all can run it)."""


@dataclass(frozen=True)
class Candidate:
    """A provider entry with the graph variant it would run; `full_offload` forbids leaving nodes to the CPU."""

    entry: ProviderEntry
    variant: str
    full_offload: bool = False

    @property
    def provider(self) -> str:
        return self.entry.provider

    @property
    def key(self) -> str:
        return self.entry.key

    def to_json(self) -> dict:
        return {"key": self.key, "provider": self.provider, "device_class": self.entry.device_class,
                "variant": self.variant, "full_offload": self.full_offload}


@dataclass
class Placement:
    """The candidates for one model, in the order they are tried, and why the other entries were passed over."""

    role: str
    request: str
    strict: bool
    candidates: list[Candidate]
    skipped: list[tuple[str, str]]  # (entry key, why it is not a candidate)
    available: Available = field(repr=False)

    @property
    def first(self) -> Candidate:
        return self.candidates[0]

    def satisfies(self, candidate: Candidate) -> bool:
        """Whether running on `candidate` is what the user asked for (so no fallback notice is due)."""
        if self.request == "auto":
            return True
        return self.request in (candidate.key, candidate.entry.device_class)

    def to_json(self) -> dict:
        return {"role": self.role, "request": self.request, "strict": self.strict,
                "candidates": [c.to_json() for c in self.candidates],
                "skipped": [{"key": k, "why": why} for k, why in self.skipped]}


def parse_device(device: str | Mapping[str, str]) -> dict[str, str]:
    """Normalize `device` to {role: request}; a request is "auto", a device class or a registry entry key."""
    valid = ("auto", *DEVICE_CLASSES, *ENTRIES)
    if isinstance(device, str):
        requests = dict.fromkeys(ROLES, device)
    elif isinstance(device, Mapping):
        unknown = set(device) - set(ROLES)
        if unknown:
            raise ValueError(f"device keys must be {' / '.join(ROLES)}, got {', '.join(sorted(map(str, unknown)))}")
        requests = {role: device.get(role, "auto") for role in ROLES}
    else:
        raise ValueError(f"device must be a string or a {{'target': ..., 'draft': ...}} dict, got {device!r}")
    out = {}
    for role, request in requests.items():
        if not isinstance(request, str) or request.strip().lower() not in valid:
            raise ValueError(f"unknown device {request!r} for the {role}; expected auto, cpu, npu, gpu or one of "
                             f"{', '.join(ENTRIES)}")
        out[role] = request.strip().lower()
    return out


def order(request: str, strict: bool) -> list[ProviderEntry]:
    """Entries to consider for a request, best first. Outside strict mode every request ends on the CPU."""
    if request == "auto":
        chain = [e for c in DEVICE_CLASSES for e in entries_for(c)]
    elif request in DEVICE_CLASSES:
        chain = list(entries_for(request))
    else:
        chain = [ENTRIES[request]]
    if not strict:
        chain += [e for e in entries_for("cpu") if e not in chain]
    return chain


def unusable_reason(entry: ProviderEntry, available: Available) -> str | None:
    """Why an entry cannot be used here at all, or None. A provider whose devices onnxruntime did not
    enumerate (most built-in ones) counts as usable: session creation is the real test."""
    if not available.has(entry.provider):
        hint = f" (plugin package {entry.plugin.replace('_', '-')})" if entry.plugin else ""
        return f"{entry.provider} is not in this onnxruntime{hint}"
    found = available.hardware.get(entry.provider)
    if found is not None and entry.hardware not in found:
        return f"{entry.provider} found no {entry.hardware} here (it has {', '.join(found) or 'no device'})"
    return None


def classes_served(available: Available) -> dict[str, list[str]]:
    """Device class -> usable entry keys, best first."""
    return {c: [e.key for e in entries_for(c) if unusable_reason(e, available) is None] for c in DEVICE_CLASSES}


def summarize(available: Available) -> str:
    """One line for error messages: what this onnxruntime offers and which classes that serves."""
    served = ", ".join(f"{c}: {' > '.join(keys) or 'none'}" for c, keys in classes_served(available).items())
    return f"onnxruntime {available.onnxruntime} offers {', '.join(available.providers)} ({served})"


def plan_role(role: str, request: str, available: Available, variants: Sequence[str],
              strict: bool = False) -> Placement:
    """Candidates for one model. Strict: only the best usable entry of the request, nothing to fall back to."""
    if not variants:
        raise ValueError(f"the {role} has no graphs to place")
    candidates, skipped = [], []
    for entry in order(request, strict):
        why = unusable_reason(entry, available)
        variant = next((v for v in entry.variants if v in variants), None)
        if why is None and variant is None:
            why = f"needs a {' or '.join(entry.variants)} graph; the {role} has {', '.join(variants)}"
        if why is not None:
            skipped.append((entry.key, why))
            continue
        # the CPU provider is where unclaimed nodes go, so "all of the graph" means nothing for it
        full = strict and entry.provider != CPU_PROVIDER and (entry.device_class != "cpu" or request == entry.key)
        candidates.append(Candidate(entry, variant, full))
        if strict:
            break
    if not candidates:
        reasons = "; ".join(f"{k}: {why}" for k, why in skipped)
        raise DevicePlacementError(f"{role}: strict placement on {request!r} is impossible ({reasons}). "
                                   f"Available here: {summarize(available)}")
    return Placement(role, request, strict, candidates, skipped, available)


def plan(device: str | Mapping[str, str], available: Available,
         graph_variants: Mapping[str, Sequence[str]] | Sequence[str], strict: bool = False) -> dict[str, Placement]:
    """Placement per model role. `graph_variants` maps role -> the variants its bundle graphs implement
    (a plain list applies to both roles); roles absent from it are not planned."""
    requests = parse_device(device)
    if isinstance(graph_variants, Mapping):
        by_role = dict(graph_variants)
    else:
        by_role = dict.fromkeys(ROLES, list(graph_variants))
    unknown = set(by_role) - set(ROLES)
    if unknown:
        raise ValueError(f"graph_variants roles must be {' / '.join(ROLES)}, got {', '.join(sorted(unknown))}")
    return {role: plan_role(role, requests[role], available, variants, strict) for role, variants in by_role.items()}


def bundle_variants(manifest) -> dict[str, list[str]]:
    """Role -> graph variants of an edgespec.runtime.bundle.Manifest, for `plan`."""
    return {role: sorted({g.variant for g in m.graphs.values()}) for role, m in manifest.models.items()}


def resolve_options(entry: ProviderEntry, threads: int, cache_dir: str | Path | None = None,
                    plugin: bool = False) -> dict[str, str]:
    """Provider options for one session: thread placeholders filled, cache directories set, and for a
    plugin the options its OrtEpDevice choice already made dropped."""
    options = {k: (str(threads) if v == THREADS else v) for k, v in entry.options.items()
               if not (plugin and k in entry.device_options)}
    if cache_dir is not None and entry.cache_option:
        directory = Path(cache_dir) / entry.key
        directory.mkdir(parents=True, exist_ok=True)
        options[entry.cache_option] = str(directory)
    return options


def node_assignment(session: ort.InferenceSession) -> dict[str, dict[str, int]]:
    """Provider -> {op type: node count} after partitioning; empty when onnxruntime cannot say (an older version, or
    the session was created without `session.record_ep_graph_assignment_info`)."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # older onnxruntime has no such method; without the config entry it raises Fail
        return {}
    counts: dict[str, dict[str, int]] = {}
    for subgraph in subgraphs:
        ops = counts.setdefault(subgraph.ep_name, {})
        for node in subgraph.get_nodes():
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return counts


def open_session(model_path: str | Path | Mapping[str, str | Path], role: str, choice: Placement | Candidate,
                 session_options: Callable[[], ort.SessionOptions] | None = None, strict: bool = False,
                 cache_dir: str | Path | None = None) -> tuple[ort.InferenceSession, Candidate]:
    """Create the session on the first candidate that can run the graph; returns it and that candidate.

    `model_path` is one graph, or variant -> graph so each candidate gets the variant it takes.
    `session_options` is a factory (e.g. `SessionConfig.session_options`), because every attempt needs
    fresh options: provider and config entries added to a SessionOptions cannot be taken back.
    `cache_dir` keeps compiled graphs (EP-context models, OpenVINO/CoreML blob caches) between runs.
    """
    placement = choice if isinstance(choice, Placement) else None
    candidates = placement.candidates if placement else [choice]
    strict = strict or (placement is not None and placement.strict)
    make_options = session_options or ort.SessionOptions
    failures: list[tuple[str, str]] = []
    for candidate in candidates:
        path = model_path.get(candidate.variant) if isinstance(model_path, Mapping) else model_path
        if path is None:
            failures.append((candidate.key, f"no {candidate.variant} graph was given"))
            continue
        if strict and not candidate.full_offload and candidate.entry.device_class != "cpu":
            candidate = Candidate(candidate.entry, candidate.variant, True)
        try:
            session = _create(Path(path), candidate, make_options, cache_dir)
        except Exception as exc:  # onnxruntime raises Fail/EPFail/NotImplemented/InvalidGraph...
            why = _why(exc)
            if strict:
                raise DevicePlacementError(f"{role}: {candidate.key} ({candidate.provider}) cannot run "
                                           f"{Path(path).name}: {why}. Available here: "
                                           f"{summarize(placement.available if placement else detect())}") from exc
            failures.append((candidate.key, why))
            continue
        _note_fallback(role, placement, candidate, failures)
        _note_partial_offload(role, candidate, session)
        return session, candidate
    reasons = "; ".join(f"{k}: {why}" for k, why in failures)
    raise DevicePlacementError(f"{role}: no provider could open the graph ({reasons}). "
                               f"Available here: {summarize(placement.available if placement else detect())}")


def _create(path: Path, candidate: Candidate, make_options: Callable[[], ort.SessionOptions],
            cache_dir: str | Path | None) -> ort.InferenceSession:
    entry = candidate.entry
    available = detect()
    plugin = available.is_plugin(entry.provider)

    def options_for(context_out: Path | None) -> tuple[ort.SessionOptions, dict[str, str]]:
        so = make_options()
        for key, value in entry.session_config.items():
            so.add_session_config_entry(key, value)
        if candidate.full_offload:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if context_out is not None:
            so.add_session_config_entry("ep.context_enable", "1")
            so.add_session_config_entry("ep.context_file_path", str(context_out))
        threads = so.intra_op_num_threads or os.cpu_count() or 1
        return so, resolve_options(entry, threads, cache_dir, plugin)

    def create(model: Path, so: ort.SessionOptions, options: dict[str, str]) -> ort.InferenceSession:
        if plugin:
            devices = ep_devices(entry.provider, entry.hardware)
            if not devices:
                raise RuntimeError(f"{entry.provider} has no {entry.hardware} device")
            so.add_provider_for_devices(devices[:1], options)
            session = ort.InferenceSession(str(model), so)
        else:
            # the CPU provider backs up unclaimed nodes; naming it while forbidding that is an error in onnxruntime
            backup = entry.provider != CPU_PROVIDER and not candidate.full_offload
            providers = [(entry.provider, options)] + ([CPU_PROVIDER] if backup else [])
            session = ort.InferenceSession(str(model), so, providers=providers)
        if entry.provider not in session.get_providers():  # onnxruntime drops a provider it cannot create
            raise RuntimeError(f"onnxruntime could not create {entry.provider} with {options or 'no options'}")
        return session

    if not (entry.ep_context and cache_dir is not None):
        return create(path, *options_for(None))
    context = _context_path(Path(cache_dir), path, entry)
    if context.is_file():
        try:
            return create(context, *options_for(None))
        except Exception as exc:  # e.g. written by another onnxruntime/SDK version: compile again
            log.info("%s: cached compiled graph %s is unusable (%s); compiling again", entry.key, context.name,
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            context.unlink()
    context.parent.mkdir(parents=True, exist_ok=True)
    return create(path, *options_for(context))


def _context_path(cache_dir: Path, path: Path, entry: ProviderEntry) -> Path:
    """An EP-context file name that changes when the graph, onnxruntime or the options change."""
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, ort.__version__, entry.key,
                      sorted(entry.options.items())])
    return cache_dir / entry.key / f"{path.stem}.{hashlib.sha256(key.encode()).hexdigest()[:12]}_ctx.onnx"


def _why(exc: Exception) -> str:
    text = str(exc)
    if PARTIAL_OFFLOAD in text:
        return "it cannot take the whole graph (some nodes would fall back to the CPU provider)"
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first[:300].rstrip(".")


def _note_fallback(role: str, placement: Placement | None, used: Candidate, failures: list[tuple[str, str]]) -> None:
    """One warning line when the model does not run where it was asked to, naming every reason."""
    if placement is None or (not failures and placement.satisfies(used)):
        return
    passed_over = [(k, why) for k, why in placement.skipped if placement.request != "auto"
                   and placement.request in (k, ENTRIES[k].device_class)]
    reasons = "; ".join(f"{k}: {why}" for k, why in passed_over + failures)
    log.warning("%s: device %r fell back to %s (%s, %s graph): %s", role, placement.request, used.key,
                used.provider, used.variant, reasons)


def _note_partial_offload(role: str, used: Candidate, session: ort.InferenceSession) -> None:
    if used.provider == CPU_PROVIDER:
        return
    assigned = node_assignment(session)
    elsewhere = {p: ops for p, ops in assigned.items() if p != used.provider}
    if elsewhere:
        total = sum(sum(ops.values()) for ops in assigned.values())
        mine = sum(assigned.get(used.provider, {}).values())
        rest = ", ".join(f"{op} x{n}" for ops in elsewhere.values() for op, n in sorted(ops.items()))
        log.info("%s: %s runs %d of %d nodes; the rest run on %s: %s", role, used.provider, mine, total,
                 ", ".join(elsewhere), rest)
