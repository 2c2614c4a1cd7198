"""Which graph of each model runs on which execution provider."""

from __future__ import annotations

from edgespec.runtime.bundle import Manifest
from edgespec.runtime.model import ModelRunner, SessionConfig


def runners_for(manifest: Manifest, config: SessionConfig, device: str | dict, strict: bool,
                load_draft: bool) -> tuple[ModelRunner, ModelRunner | None]:
    """Create the target (and draft) runners on the providers the device plan chooses."""
    target = ModelRunner(manifest, manifest.target, config)
    draft = None
    if load_draft and manifest.draft is not None:
        draft = ModelRunner(manifest, manifest.draft, config)
    return target, draft
