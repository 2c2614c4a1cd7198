"""Shared fixtures: tiny random models (seconds) and the real default model (exported once per run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import make_tiny_model_dir  # noqa: E402


def quiet(_: str) -> None:
    """Export log sink for tests."""


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dir, tmp_path_factory) -> Path:
    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    return export_bundle(str(tiny_dir), out, options=ExportOptions(quant="fp32", max_context=256, log=quiet),
                         parity=False)


@pytest.fixture(scope="session")
def tiny_pair_bundle(tiny_dir, tmp_path_factory) -> Path:
    """Tiny target plus a draft derived from its first layer (so the two agree part of the time)."""
    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    root = tmp_path_factory.mktemp("pair")
    return export_bundle(str(tiny_dir), root / "bundle", derive_layers=1,
                         options=ExportOptions(quant="fp32", max_context=256, log=quiet), parity=False)


@pytest.fixture(scope="session")
def default_model():
    from edgespec.export.sources import load

    return load("default")


def _default_bundle(default_model, tmp_path_factory, quant: str, **kwargs) -> Path:
    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    out = tmp_path_factory.mktemp("default") / f"smollm2-{quant}"
    return export_bundle("default", out, options=ExportOptions(quant=quant, max_context=1024, log=print),
                         parity=True, preloaded={"default": default_model}, **kwargs)


@pytest.fixture(scope="session")
def default_fp32(default_model, tmp_path_factory) -> Path:
    return _default_bundle(default_model, tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def default_int8(default_model, tmp_path_factory) -> Path:
    """int8 target with a 4-layer draft derived from it and a trigram table: every mode can run."""
    return _default_bundle(default_model, tmp_path_factory, "int8", derive_layers=4, ngram_tokens=1500)


@pytest.fixture(scope="session")
def default_w8a8(default_model, tmp_path_factory) -> Path:
    """W8A8 target with the same kind of draft and table as default_int8."""
    return _default_bundle(default_model, tmp_path_factory, "w8a8", derive_layers=4, ngram_tokens=1500)


@pytest.fixture(scope="session")
def default_int4(default_model, tmp_path_factory) -> Path:
    return _default_bundle(default_model, tmp_path_factory, "int4")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: torch's threads on a shared CPU spend more on handing work over than on the work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
