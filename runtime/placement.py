"""Open each model of a bundle on the execution provider the device plan chooses.

The plan (edgespec.devices) decides provider and graph variant per role, so the draft and the
target may sit on different providers. On the default CPU provider the runtime opens the graph
itself, with the optimized-graph cache in the bundle; other providers go through
`devices.open_session`, which handles fallback, strict placement and compiled-graph caches.
"""

from __future__ import annotations

import logging

from edgespec.devices.detect import detect
from edgespec.devices.placement import Candidate, bundle_variants, open_session, plan
from edgespec.runtime.bundle import Manifest
from edgespec.runtime.cache import CACHE_DIR
from edgespec.runtime.model import ModelRunner, SessionConfig, open_graph_session

log = logging.getLogger("edgespec.runtime")


def _open_role(manifest: Manifest, role: str, placement, config: SessionConfig, strict: bool) -> ModelRunner:
    info = manifest.models[role]
    first = placement.first
    graphs = [g for g in info.graphs.values() if g.variant == first.variant]
    if first.key == "default-cpu" and first.variant == "fused":
        sessions, load_info = [], {}
        for g in graphs:
            session, load_info = open_graph_session(manifest, g.file, config)
            sessions.append((g, session))
        return ModelRunner(info, manifest.max_context, sessions, load_info=load_info | {"provider": first.key},
                           min_rows=_min_rows(role, graphs))
    by_variant = {v: manifest.path(next(g.file for g in info.graphs.values() if g.variant == v))
                  for v in {c.variant for c in placement.candidates}}
    session, used = open_session(by_variant, role, placement, config.session_options, strict,
                                 cache_dir=manifest.root / CACHE_DIR)
    if used.key == "default-cpu" and used.variant == "fused":  # fell back: reopen with the graph cache
        return _open_role(manifest, role, _only(placement, used), config, strict)
    graphs = [g for g in info.graphs.values() if g.variant == used.variant]
    sessions = [(graphs[0], session)]
    for g in graphs[1:]:  # further static chunk sizes run where the first one did
        extra, _ = open_session(manifest.path(g.file), role, used, config.session_options, strict,
                                cache_dir=manifest.root / CACHE_DIR)
        sessions.append((g, extra))
    return ModelRunner(info, manifest.max_context, sessions, load_info={"provider": used.key, "variant": used.variant},
                       min_rows=_min_rows(role, graphs))


def _min_rows(role: str, graphs) -> int:
    """Only the target's logits must not depend on pass size (see ModelRunner); the draft's may, and so
    may an --ar-only target's, which is never asked to verify."""
    return 2 if role == "target" and all(g.pass_size_invariant for g in graphs) else 1


def _only(placement, candidate: Candidate):
    """The same placement narrowed to one candidate (already proven to open)."""
    from dataclasses import replace

    return replace(placement, candidates=[candidate])


def runners_for(manifest: Manifest, config: SessionConfig, device: str | dict, strict: bool,
                load_draft: bool) -> tuple[ModelRunner, ModelRunner | None]:
    """Create the target (and draft) runners on the providers the device plan chooses."""
    variants = bundle_variants(manifest)
    roles = ["target"] + (["draft"] if load_draft and manifest.draft is not None else [])
    plans = plan(device, detect(), {r: variants[r] for r in roles}, strict)
    runners = {role: _open_role(manifest, role, plans[role], config, strict) for role in roles}
    for role, runner in runners.items():
        log.info("%s runs on %s", role, runner.load_info.get("provider"))
    return runners["target"], runners.get("draft")
