"""What onnxruntime offers here and where a bundle's graphs would run (`edgespec devices`, runtime/cli.py).

The answers come from the same `detect` and `plan` the runtime uses, so the report cannot drift
from what `Engine.load` does; it shows the first candidate of each plan (before any session is
tried: a provider may still fail at session creation and fall back further). The runtime imports
this package, never the reverse: a bundle's manifest arrives loaded.
"""

from __future__ import annotations

from edgespec.devices.detect import Available, detect
from edgespec.devices.placement import bundle_variants, classes_served, plan, unusable_reason
from edgespec.devices.registry import DEVICE_CLASSES, ENTRIES

REQUESTS = ("auto", *DEVICE_CLASSES)


def describe(bundle_manifest=None, available: Available | None = None) -> dict:
    """Providers, the device classes each serves, and for a bundle's manifest (runtime/bundle.py `Manifest`)
    each role's placement."""
    available = available or detect()
    providers = []
    for name in available.providers:
        providers.append({"name": name, "kind": "plugin" if available.is_plugin(name) else "built-in",
                          "package": available.plugins.get(name),
                          "hardware": list(available.hardware[name]) if name in available.hardware else None,
                          "serves": [e.key for e in ENTRIES.values()
                                     if e.provider == name and unusable_reason(e, available) is None]})
    info = {"onnxruntime": available.onnxruntime, "providers": providers, "classes": classes_served(available),
            "problems": dict(available.problems)}
    if bundle_manifest is not None:
        info["bundle"] = _bundle(bundle_manifest, available)
    return info


def _bundle(manifest, available: Available) -> dict:
    variants = bundle_variants(manifest)
    models = {}
    for role, model in manifest.models.items():
        graphs = {name: {"variant": g.variant, "chunk": g.chunk} for name, g in model.graphs.items()}
        placements = {}
        for request in REQUESTS:
            placement = plan(request, available, {role: variants[role]})[role]
            first = placement.first
            placements[request] = {**first.to_json(),
                                   "graphs": [n for n, g in model.graphs.items() if g.variant == first.variant],
                                   "fallback": not placement.satisfies(first)}
        models[role] = {"graphs": graphs, "placement": placements}
    return {"path": str(manifest.root), "max_context": manifest.max_context, "models": models}


def render_text(info: dict) -> str:
    """The human-readable form of `describe`."""
    lines = [f"onnxruntime {info['onnxruntime']}", "providers:"]
    for p in info["providers"]:
        kind = p["kind"] + (f" ({p['package']})" if p["package"] else "")
        hardware = ", ".join(p["hardware"]) if p["hardware"] is not None else "not enumerated"
        lines.append(f"  {p['name']:<28} {kind:<36} devices: {hardware:<16} serves: {', '.join(p['serves']) or '-'}")
    lines.append("device classes (best first):")
    for cls, keys in info["classes"].items():
        lines.append(f"  {cls}: {' > '.join(keys) or 'none'}")
    for package, why in info["problems"].items():
        lines.append(f"  problem: {package}: {why}")
    bundle = info.get("bundle")
    if bundle:
        lines.append(f"bundle {bundle['path']} (max_context {bundle['max_context']}):")
        for role, model in bundle["models"].items():
            graphs = ", ".join(f"{n} ({g['variant']}, chunk {g['chunk'] or 'dynamic'})"
                               for n, g in model["graphs"].items())
            lines.append(f"  {role}: {graphs}")
            for request, p in model["placement"].items():
                note = "  (fallback: nothing of that class runs it here)" if p["fallback"] else ""
                lines.append(f"    --device {request:<5} -> {p['key']} ({p['provider']}), "
                             f"{p['variant']} graph {', '.join(p['graphs'])}{note}")
    return "\n".join(lines)
