"""The agent's records in their wire form: results, alerts, cases and status as ``oragent.v1`` messages.

Kept apart from the service so that the contract's shape is in one place, testable without a server
or an event loop: everything here is a pure conversion of what it is given (the only outside reads
are the clocks that stamp an overlay's capture time and the pipeline's own statistics).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from or_agent.agent import VERSION
from or_agent.agent.alert_log import ActiveAlert, AlertRecord
from or_agent.pipelines.messages import FrameResult
from or_agent.proto.oragent.v1 import agent_pb2 as pb

if TYPE_CHECKING:
    from or_agent.agent.session import CaseSession

SEVERITY_PB = {"info": pb.INFO, "warning": pb.WARNING, "critical": pb.CRITICAL}
KIND_PB = {"raised": pb.AlertEvent.RAISED, "updated": pb.AlertEvent.UPDATED, "cleared": pb.AlertEvent.CLEARED,
           "acknowledged": pb.AlertEvent.ACKNOWLEDGED, "reannounced": pb.AlertEvent.REANNOUNCED}


def alert_to_pb(rec: AlertRecord, models: list, instance: str = "") -> pb.AlertEvent:
    return pb.AlertEvent(sequence=rec.sequence, alert_id=rec.alert_id, rule=rec.rule, severity=SEVERITY_PB[rec.severity],
                         kind=KIND_PB[rec.kind], message=rec.message, evidence=rec.evidence,
                         frame_sequence=rec.frame_sequence, frame_media_ms=rec.frame_media_ms,
                         event_unix_ms=rec.unix_ms, acknowledged_by=rec.acknowledged_by, models=models,
                         agent_instance=instance)


def active_alerts_to_pb(active: list[ActiveAlert]) -> list[pb.ActiveAlert]:
    return [pb.ActiveAlert(alert_id=a.alert_id, rule=a.rule, severity=SEVERITY_PB[a.severity], message=a.message,
                           acknowledged=a.acknowledged) for a in active]


def overlay_to_pb(r: FrameResult, models: list, alerts: list, include_anatomy: bool, model_set: str = "") -> pb.Overlay:
    """The wire form of one result. A paused frame (camera out of body, or a scene the models do not know:
    ``FrameResult.paused_reason``) says AI paused and why, and carries no phase, anatomy or classification."""
    now_ns, now_ms = time.monotonic_ns(), time.time() * 1000
    msg = pb.Overlay(sequence=r.seq, media_ms=r.media_ms,
                     capture_unix_ms=int(now_ms - (now_ns - r.marks_ns["capture"]) / 1e6),
                     capture_to_publish_ms=r.latency_ms("capture", "publish") if "publish" in r.marks_ns else 0.0,
                     frame_width=r.frame_size[0], frame_height=r.frame_size[1], models=models, active_alerts=alerts,
                     model_set=model_set, withheld=[pb.Withheld(output=o, reason=why) for o, why in r.withheld])
    if r.visibility is not None:
        v = r.visibility
        msg.visibility.CopyFrom(pb.VisibilityState(out_of_body=v.out_of_body, low_visibility=v.low_visibility,
                                                   p_out_of_body=v.p_out_of_body, p_low_visibility=v.p_low_visibility))
    reason = r.paused_reason
    if reason is not None:
        msg.ai_paused, msg.paused_reason = True, reason
        return msg
    if r.phase is not None:
        p = r.phase
        msg.phase.CopyFrom(pb.PhaseState(id=p.phase, name=p.name, probabilities=p.probabilities,
                                         confidence=p.confidence, time_in_phase_s=p.time_in_phase_s))
    if include_anatomy:
        for seg in r.segmentations:  # every segmentation model's regions, each naming its model
            fractions = seg.frame_fractions(r.frame_size)
            for c, polys in sorted((r.polygons or {}).get(seg.model, {}).items()):
                msg.anatomy.append(pb.AnatomyRegion(
                    class_id=c, name=seg.names[c], confidence=seg.confidence[c], area_fraction=fractions[c], model=seg.model,
                    polygons=[pb.Polygon(xy=poly.reshape(-1).tolist()) for poly in polys]))
    for c in r.classifications:
        msg.classifications.append(pb.Classification(
            model=c.model, name=c.name, labels=[pb.LabelProbability(label=k, probability=v) for k, v in c.items()]))
    return msg


def unavailable_to_pb(reason: str, alerts: list, models: list) -> pb.Overlay:
    """The overlay that says there is no current AI result, so that no display keeps showing an old one."""
    return pb.Overlay(ai_paused=True, paused_reason=reason, capture_unix_ms=int(time.time() * 1000),
                      active_alerts=alerts, models=models)


def jpeg_field(jpeg: bytes) -> bytes:
    """The composited JPEG as serialised bytes to append to an overlay already serialised: a message
    is the concatenation of its fields, so appending field 14 adds it without serialising again."""
    return pb.Overlay(composited_jpeg=jpeg).SerializeToString()


def position_field(position: int) -> bytes:
    """A stream's position as serialised bytes to append to an overlay (field 18), as ``jpeg_field``:
    the overlay is serialised once for every display, its position is each display's own."""
    return pb.Overlay(stream_position=position).SerializeToString()


def case_info_to_pb(session: CaseSession) -> pb.CaseInfo:
    return pb.CaseInfo(case_id=session.spec.case_id, source=session.source_label, started_unix_ms=session.started_unix_ms,
                       stopped_unix_ms=session.stopped_unix_ms,
                       state=pb.Status.PipelineState.Value(session.state() if not session.stopped_unix_ms else "IDLE"))


def status_to_pb(state: str, models: list, uptime_s: float, subscribers: int, preprocessing: str,
                 session: CaseSession | None, frames_per_second: float, last_error: str = "",
                 audit_warning: str = "") -> pb.Status:
    """``GetStatus``'s answer; ``frames_per_second`` is the recent rate, as the contract says, so that a
    stall shows at once. ``last_error``: the case's last source trouble, shown unless the pipeline failed;
    ``audit_warning``: the damage found in the audit trail when the agent started."""
    st = pb.Status(state=pb.Status.PipelineState.Value(state), models=models, uptime_s=uptime_s,
                   subscribers=subscribers, agent_version=VERSION, preprocessing=preprocessing,
                   audit_warning=audit_warning)
    if session is not None:
        stats = session.pipeline.stats()
        lat = stats["latency_ms"]["end_to_end"]
        st.source, st.case_id = session.source_label, session.spec.case_id  # the name only, never a full path
        st.frames_per_second = frames_per_second
        st.frames_processed, st.frames_dropped = stats["frames_out"], stats["frames_dropped_source"]
        st.capture_to_publish.CopyFrom(pb.LatencyPercentiles(p50_ms=lat["p50_ms"], p95_ms=lat["p95_ms"],
                                                             p99_ms=lat["p99_ms"], max_ms=lat["max_ms"], count=lat["count"]))
        if session.pipeline.error is not None:
            st.last_error = session.public(str(session.pipeline.error))
        else:
            st.last_error = last_error  # already public: the session names the source by its label in events
    return st
