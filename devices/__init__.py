"""Execution-provider detection and placement: which provider runs each model's graphs, with a clear fallback."""

from edgespec.devices.detect import Available, detect
from edgespec.devices.placement import Candidate, DevicePlacementError, Placement, open_session, plan

__all__ = ["Available", "Candidate", "DevicePlacementError", "Placement", "detect", "open_session", "plan"]
