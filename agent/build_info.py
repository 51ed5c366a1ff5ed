"""What a run was made with: the agent's version, the model set, and a hash of the configuration.

Recorded by every output a team may compare later (replay's ``summary.json``, qualify's report, the
metrics endpoint's build info), so that two results can be told apart by what produced them. The
version is written in one place only, ``or_agent/__init__.py``; ``setup.py`` reads it there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from or_agent.agent import VERSION


def config_sha256(config: Any) -> str:
    """The sha256 of a configuration's canonical JSON (keys sorted; a dataclass as its fields), so that
    two runs with the same effective configuration have the same hash. For ``AgentConfig`` it is the
    audit trail's ``config_sha256``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def model_set_identity(model_set) -> dict[str, str]:
    """A loaded ``ModelSet``'s name and version."""
    return {"name": model_set.name, "version": model_set.version}


def build_record(model_set, config: Any) -> dict[str, Any]:
    """The fields an output records about what produced it."""
    return {"agent_version": VERSION, "model_set": model_set_identity(model_set), "config_sha256": config_sha256(config)}


def default_model_set() -> str:
    """The name of the model set a command uses without ``--models``, read from its ``model-set.json``
    without loading any model; "" when there is none to be found."""
    from or_agent.pipelines.errors import OrAgentError
    from or_agent.pipelines.manifest import SET_FILE, resolve_models_dir

    try:
        doc = json.loads((resolve_models_dir(None) / SET_FILE).read_text())
    except (OrAgentError, OSError, ValueError):
        return ""
    name, version = doc.get("name"), doc.get("version")
    return f"{name} {version}" if isinstance(name, str) and isinstance(version, str) else ""


def version_line() -> str:
    """What ``or-agent --version`` prints."""
    model_set = default_model_set()
    return f"or-agent {VERSION}" + (f" (default model set: {model_set})" if model_set else "")
