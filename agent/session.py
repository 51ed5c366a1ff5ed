"""A case: one source, one pipeline run, from start to stop, on the models loaded at launch.

The session owns its source and pipeline and always releases them in ``stop()``. It reports the
pipeline's state for the status call and health: RUNNING while fresh results flow, STALLED when
none arrived within ``stale_after_s``, SOURCE_LOST while a live source reconnects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from or_agent.agent.config import PipelineSettings, is_plain_name
from or_agent.agent.source_policy import public_name
from or_agent.pipelines.backends.select import choose_backend
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.frame_path import choose_frame_path
from or_agent.pipelines.manifest import ModelManifest
from or_agent.pipelines.messages import FrameResult, SourceEvent
from or_agent.pipelines.model_set import ModelSet, load_model_set
from or_agent.pipelines.rules import Rule, load_rules, system_rules
from or_agent.pipelines.runtime import Pipeline, PipelineConfig
from or_agent.pipelines.sources import open_source
from or_agent.pipelines.stages import StageGraph, compose

log = logging.getLogger("or-agent.session")


class LoadedModels:
    """A model set's stages, verified and loaded once per agent process, each on the backend chosen for
    it (``auto``: TensorRT where an engine for this GPU is cached, else ONNX Runtime), with the reason;
    and the frame path that makes their inputs (``auto``: the GPU kernels where a model runs on
    TensorRT, else the CPU), with its reason. ``models_dir`` is a set's name or folder, or a models
    directory (``--models SET|DIR``)."""

    def __init__(self, models_dir: str | None = None, threads: int = 1, backend: str = "auto",
                 cache_dir: str | None = None, live_session: bool = True, preprocessing: str = "auto",
                 cuda_graphs: bool = False, build_engines_live: bool = False):
        self.model_set: ModelSet = load_model_set(models_dir or None)
        self.manifests: dict[str, ModelManifest] = {m.name: m for m in self.model_set.models}  # by model name
        self.reasons: dict[str, str] = {}
        backends = []
        try:
            for m in self.model_set.models:
                b, self.reasons[m.name] = choose_backend(m, backend, cache_dir or None, threads, live_session,
                                                         cuda_graphs=cuda_graphs, build_missing=build_engines_live)
                backends.append(b)
                log.info("%s model %s: %s", m.task, m.name, self.reasons[m.name])
            self.stages: StageGraph = compose(backends)
            self.frame_path, self.frame_path_reason = choose_frame_path(preprocessing, [b.name for b in backends])
        except BaseException:
            for b in backends:
                b.close()
            raise
        log.info("preprocessing: %s", self.frame_path_reason)

    def rules(self, rules_file: str | None = None, overrides: dict[str, dict] | None = None) -> list[Rule]:
        """The alert rules: ``rules_file`` if given, else the set's own, checked against the set's outputs; and
        the agent's own system rules."""
        s = self.model_set
        return load_rules(rules_file or s.rules_file, overrides, vocabulary=s.outputs, owner=f"model set {s.name!r}") + system_rules()

    def pipeline(self, source, config: PipelineConfig | None = None) -> Pipeline:
        """A pipeline over ``source`` on these models and this frame path (one running at a time)."""
        config = replace(config or PipelineConfig(), withheld=self.model_set.withheld)
        return Pipeline(source, self.stages, config, frame_path=self.frame_path)

    def backend_name(self, model: str) -> str:
        return next(s.backend.name for s in self.stages.stages if s.name == model)

    def close(self) -> None:
        self.stages.close()
        self.frame_path.close()

    def __enter__(self) -> LoadedModels:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class CaseSpec:
    source: str
    case_id: str
    paced: bool = True

    def __post_init__(self):
        if not self.source.strip():
            raise InputError("source: empty (give a video file, camera index, /dev/videoN or stream URL)")
        if not is_plain_name(self.case_id):
            raise InputError(f"case_id: use 1-64 letters, digits, '.', '_' or '-' (no patient data), got {self.case_id!r}")


class CaseSession:
    def __init__(self, spec: CaseSpec, models: LoadedModels, settings: PipelineSettings,
                 on_result: Callable[[FrameResult], None], on_event: Callable[[SourceEvent], None]):
        self.spec = spec
        self.settings = settings
        self.started_unix_ms = 0
        self.stopped_unix_ms = 0
        self.last_result_ns = 0
        self.source_lost = False
        self._on_result = on_result
        self._on_event = on_event
        self.source = open_source(spec.source, paced=spec.paced)
        # the source's name outside the agent: status, case info, logs, alerts, the audit trail
        self.source_label = public_name(self.source.name)
        self.pipeline = models.pipeline(self.source, replace(settings.runtime, keep_images=True, encode_polygons=True))
        self.pipeline.subscribe(self._result)
        self.pipeline.subscribe_events(self._event)
        self._lock = threading.Lock()
        self._started_ns = 0

    def _result(self, r: FrameResult) -> None:
        self.last_result_ns = time.monotonic_ns()
        self._on_result(r)

    def public(self, text: str) -> str:
        """``text`` (a source's message or error) with the source's full name replaced by its label."""
        name = self.source.name
        return text.replace(name, self.source_label) if name and name != self.source_label else text

    def _event(self, e: SourceEvent) -> None:
        e = replace(e, source=self.source_label, message=self.public(e.message))
        if e.kind == "disconnected":
            self.source_lost = True
        elif e.kind in ("reconnected", "opened"):
            self.source_lost = False
        self._on_event(e)

    def start(self) -> None:
        """Open the source and start the pipeline; bad sources raise InputError here."""
        self.started_unix_ms = int(time.time() * 1000)
        self._started_ns = time.monotonic_ns()
        self.pipeline.start()

    def stop(self) -> None:
        with self._lock:
            if not self.stopped_unix_ms:
                self.stopped_unix_ms = int(time.time() * 1000)
                self.pipeline.stop()

    @property
    def finished(self) -> bool:
        """The source ended (a file played out) or the pipeline failed."""
        return self.pipeline.wait(0) or self.pipeline.error is not None

    def state(self) -> str:
        if self.stopped_unix_ms:
            return "IDLE"
        if self.pipeline.error is not None:
            return "FAILED"
        if self.source_lost:
            return "SOURCE_LOST"
        now = time.monotonic_ns()
        stale_ns = self.settings.stale_after_s * 1e9
        if self.last_result_ns == 0:
            return "STARTING" if now - self._started_ns < max(stale_ns, 5e9) else "STALLED"
        return "RUNNING" if now - self.last_result_ns <= stale_ns else "STALLED"

    def result_age_s(self) -> float | None:
        return None if not self.last_result_ns else (time.monotonic_ns() - self.last_result_ns) / 1e9
