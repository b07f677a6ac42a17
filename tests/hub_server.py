"""Test helpers around the loopback Hub stand-in (``hf_moeprune.demo.loopback_hub``)."""

from __future__ import annotations

import json

from hf_moeprune.demo.loopback_hub import FakeRepo, LoopbackHub, RecordedRequest

FakeHub = LoopbackHub

__all__ = ["FakeHub", "FakeRepo", "RecordedRequest", "point_hub_client_at"]


def point_hub_client_at(monkeypatch, hub: FakeHub, tmp_path) -> None:
    """Direct huggingface_hub at ``hub`` and isolate it from the user's real token and offline settings.

    huggingface_hub reads HF_ENDPOINT and HF_TOKEN_PATH into ``constants`` at import time, so the module
    attributes are patched as well as the environment. No token is left anywhere: tests pass one.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-such-token-file"))
    # huggingface_hub fetches an agent-detection registry from the endpoint once a day (a telemetry GET,
    # unauthenticated); an empty cached copy keeps it off the server and out of the user's HF_HOME.
    registry = tmp_path / "agent_harnesses.json"
    registry.write_text(json.dumps({"standardEnvVars": [], "harnesses": {}}))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(registry))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
