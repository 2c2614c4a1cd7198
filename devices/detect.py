"""Ask onnxruntime which execution providers (and which devices behind them) this process can use.

Nothing here looks at the platform name: a phone may lack the NPU its SoC advertises and a laptop
may have a plugin installed for hardware it lacks, so only onnxruntime's own answers count:
`get_available_providers()` for the providers compiled into the installed package, and
`get_ep_devices()` for plugin providers (registered first from the known plugin packages that are
installed) and for the hardware devices each provider found.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import onnxruntime as ort

from edgespec.devices.registry import PLUGIN_PACKAGES

log = logging.getLogger("edgespec.devices")


@dataclass(frozen=True)
class Available:
    """What this process can run on; plain data, so placement rules can be tested on made-up machines."""

    onnxruntime: str
    builtin: tuple[str, ...]  # get_available_providers(): compiled in, not guaranteed to work
    plugins: dict[str, str] = field(default_factory=dict)  # plugin provider name -> package that registered it
    hardware: dict[str, tuple[str, ...]] = field(default_factory=dict)  # provider -> "CPU"/"GPU"/"NPU" it found
    problems: dict[str, str] = field(default_factory=dict)  # plugin package -> why it could not be registered

    @property
    def providers(self) -> tuple[str, ...]:
        return self.builtin + tuple(p for p in self.plugins if p not in self.builtin)

    def has(self, provider: str) -> bool:
        return provider in self.builtin or provider in self.plugins

    def is_plugin(self, provider: str) -> bool:
        """Plugin providers are added through their OrtEpDevice, not by name in `providers=`."""
        return provider in self.plugins and provider not in self.builtin

    def to_json(self) -> dict:
        return {"onnxruntime": self.onnxruntime, "builtin": list(self.builtin), "plugins": dict(self.plugins),
                "hardware": {k: list(v) for k, v in self.hardware.items()}, "problems": dict(self.problems)}


_detected: Available | None = None


def detect(refresh: bool = False) -> Available:
    """Register the installed plugin packages (once per process: registration is process-wide) and report."""
    global _detected
    if _detected is not None and not refresh:
        return _detected
    builtin = tuple(ort.get_available_providers())
    plugins: dict[str, str] = {}
    problems: dict[str, str] = {}
    for package in PLUGIN_PACKAGES:
        try:
            names = _register_plugin(package, builtin)
        except ModuleNotFoundError as exc:
            if exc.name == package:
                continue  # not installed: the usual case, not a problem
            problems[package] = f"cannot be imported: {exc}"
        except Exception as exc:  # a broken install or an ABI mismatch with this onnxruntime
            problems[package] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            plugins.update({name: package for name in names})
    hardware = _hardware()
    for name in plugins:  # a registered plugin that found no device of its kind has an empty list, not an unknown one
        hardware.setdefault(name, ())
    _detected = Available(ort.__version__, builtin, plugins, hardware, problems)
    return _detected


def _register_plugin(package: str, builtin: tuple[str, ...]) -> list[str]:
    """Register a plugin package's library under its provider name; returns the names it provides.

    The packages (onnxruntime-qnn, onnxruntime-ep-openvino, onnxruntime-ep-webgpu) share one
    convention: `get_library_path()` plus `get_ep_names()` or `get_ep_name()`. A provider that is
    already compiled into this onnxruntime (e.g. the onnxruntime-openvino build) is not registered
    again: the built-in one is used.
    """
    module = importlib.import_module(package)
    names = list(module.get_ep_names()) if hasattr(module, "get_ep_names") else [module.get_ep_name()]
    names = [n for n in names if n not in builtin]
    if not names:
        return []
    registered = {d.ep_name for d in ort.get_ep_devices()}
    if not all(n in registered for n in names):
        try:
            ort.register_execution_provider_library(names[0], module.get_library_path())
        except Exception:
            # a second registration of the same library raises; it is harmless if its devices are there
            if not any(d.ep_name in names for d in ort.get_ep_devices()):
                raise
    return names


def _hardware() -> dict[str, tuple[str, ...]]:
    """Hardware types behind each provider, from onnxruntime's device discovery (and OpenVINO's own list)."""
    found: dict[str, set[str]] = {}
    for d in ort.get_ep_devices():
        found.setdefault(d.ep_name, set()).add(d.device.type.name)
    # The onnxruntime-openvino build has OpenVINO compiled in, outside get_ep_devices(); it exposes
    # OpenVINO's device list ("CPU", "GPU.0", "NPU") instead.
    from onnxruntime.capi import _pybind_state

    openvino_ids = getattr(_pybind_state, "get_available_openvino_device_ids", None)
    if openvino_ids is not None and "OpenVINOExecutionProvider" in ort.get_available_providers():
        found.setdefault("OpenVINOExecutionProvider", set()).update(i.split(".")[0] for i in openvino_ids())
    return {name: tuple(sorted(kinds)) for name, kinds in found.items()}


def ep_devices(provider: str, hardware: str) -> list:
    """The OrtEpDevice objects of a plugin provider on one hardware type (for add_provider_for_devices)."""
    return [d for d in ort.get_ep_devices() if d.ep_name == provider and d.device.type.name == hardware]
