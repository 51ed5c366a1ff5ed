"""The RPC handlers of ``oragent.v1.OrAgent``: requests checked and answered, streams run.

Kept thin and apart from the state they serve (``AgentService``) so that what a client may send, and
every status it can get back, reads in one place: malformed bytes and bad client ids are answered with
INVALID_ARGUMENT before any handler body runs, limits with RESOURCE_EXHAUSTED, and a display that
falls behind its overlays is ended rather than let to slow the others.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from or_agent.agent.access import ACKNOWLEDGE, START_STOP, Access, Caller, Refused
from or_agent.agent.config import is_plain_name
from or_agent.agent.fanout import SHUTDOWN, Subscriber
from or_agent.agent.service import AgentService
from or_agent.agent.session import CaseSpec
from or_agent.agent.source_policy import NOT_ALLOWED, SourceNotAllowed, SourcePolicy, public_name
from or_agent.agent.wire import alert_to_pb, case_info_to_pb, position_field
from or_agent.pipelines.errors import OrAgentError
from or_agent.proto.oragent.v1 import agent_pb2 as pb

# a display whose next overlay is this old loses its slot to a newcomer when every slot is taken
DISPLACE_AFTER_S = 2.0
log = logging.getLogger("or-agent.service")  # the service's: log lines keep the source they always had
SERVICE_NAME = "oragent.v1.OrAgent"
_MALFORMED = object()


def loggable(text: str, limit: int = 200) -> str:
    """A client-supplied string as it may appear in a log line: control characters (a newline would
    forge a line) escaped, and at most ``limit`` characters."""
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


# ----- request checks -----------------------------------------------------------------------
def _tolerant(parse):
    """A deserializer that turns undecodable bytes into a marker the handler answers with INVALID_ARGUMENT."""
    def deserialize(data: bytes):
        try:
            return parse(data)
        except (DecodeError, ValueError):
            return _MALFORMED
    return deserialize


async def _reject_malformed(request, context) -> None:
    if request is _MALFORMED:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request: not a valid protobuf message")


async def _check_client_id(client_id: str, context) -> None:
    if not is_plain_name(client_id):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"client_id: use 1-64 letters, digits, '.', '_' or '-', got {client_id[:80]!r}")


def _by(caller: Caller) -> str:
    return f" by {loggable(caller.name)}" if caller.certificate is not None else ""


def _public_error(message: str, source: str) -> str:
    """A source's error with the resolved path it names replaced by the source's public name."""
    return message.replace(source, public_name(source)) if source else message


class OrAgentHandlers:
    """The RPC handlers; thin, all state lives in AgentService. Every call is identified first (under
    mutual TLS by its certificate, which must not be revoked), then checked against the roles."""

    def __init__(self, service: AgentService, access: Access | None = None):
        self.s = service
        self.access = access or Access(service.config.server)
        case = service.config.case
        self.sources = SourcePolicy(case.allowed_sources, case.source)

    async def _caller(self, context, client_id: str | None = None, role: str | None = None) -> Caller:
        """The verified caller (``client_id``: the request's, where it has one); refused calls are
        aborted with the reason and logged."""
        if client_id is not None and not (self.access.mutual and client_id == ""):
            await _check_client_id(client_id, context)
        try:
            caller = self.access.identify(context.auth_context(), client_id)
            if role is not None:
                self.access.require(caller, role)
            return caller
        except Refused as r:
            log.warning("refused a call from %s: %s", loggable(context.peer()), loggable(r.message))
            await context.abort(getattr(grpc.StatusCode, r.code), r.message)
            raise  # abort raises; this only tells the type checker

    async def _still_allowed(self, caller: Caller, context, generation: int) -> int:
        """For an open stream: if the revocation list changed since ``generation``, check the caller again
        (aborting its stream if its certificate is now revoked); returns the current generation."""
        now = self.access.generation
        if now != generation:
            try:
                self.access.check_revoked(caller)
            except Refused as r:
                log.warning("ending the stream of %s: %s", loggable(caller.name), loggable(r.message))
                await context.abort(getattr(grpc.StatusCode, r.code), r.message)
        return now

    async def StreamOverlays(self, request, context):
        await _reject_malformed(request, context)
        caller = await self._caller(context, request.client_id)
        generation = self.access.generation
        cfg = self.s.config.server
        if request.jpeg_quality > 100 or request.jpeg_max_side > 8192:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "jpeg_quality must be 0-100 and jpeg_max_side 0-8192")
        reserved = caller.name in cfg.reserved_displays
        if len(self.s.fanout.subscribers) >= cfg.max_subscribers:
            # a configured display always gets in; anyone gets the slot of a display gone stale
            displaced = self.s.fanout.make_room(cfg.max_subscribers, reserved, DISPLACE_AFTER_S)
            if displaced is None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many subscribers (limit {cfg.max_subscribers})")
            else:
                log.warning("display %s (%s) gave its slot to %s: %.1f s behind", displaced.client_id, displaced.peer,
                            loggable(caller.name), displaced.age_s())
        jpeg = (request.jpeg_quality or 80, request.jpeg_max_side) if request.include_jpeg else None
        sub = self.s.fanout.subscribe(caller.name, context.peer(), request.include_anatomy, jpeg, reserved,
                                      request.reports_progress)
        log.info("display %s (%s) subscribed to overlays%s", sub.client_id, sub.peer,
                 ", reporting what it shows" if sub.reports_progress else "")
        try:
            while True:
                payload, made_at = await sub.queue.get()
                if payload is SHUTDOWN:
                    return
                if sub.displaced:
                    await self._end_behind(sub, context, cfg.behind_limit_s, displaced=True)
                    return
                generation = await self._still_allowed(caller, context, generation)
                sub.writing = made_at
                payload += position_field(sub.sent + 1)
                if sub.over_limit(cfg.behind_limit_s) or not await self._write(sub, context, payload, cfg.behind_limit_s):
                    await self._end_behind(sub, context, cfg.behind_limit_s, displaced=sub.displaced)
                    return
                sub.writing = None
                sub.written(made_at)
        finally:
            self.s.fanout.unsubscribe(sub)
            log.info("display %s unsubscribed (%d sent, %d dropped)", sub.client_id, sub.sent, sub.dropped)

    @staticmethod
    async def _write(sub: Subscriber, context, payload, limit_s: float) -> bool:
        """Send one overlay; False if the display's transport stayed full until it fell behind the limit.

        A display that reads slowly first fills gRPC's flow-control window; the write then waits
        for it, and only a watch beside the write can tell that the display stayed behind (or that
        its slot went to a live display)."""
        write = asyncio.ensure_future(context.write(payload))
        try:
            while not write.done():
                await asyncio.wait((write,), timeout=0.25)
                if not write.done() and (sub.over_limit(limit_s) or sub.displaced):
                    return False
            write.result()
            return True
        finally:
            if not write.done():
                write.cancel()

    @staticmethod
    async def _end_behind(sub: Subscriber, context, limit_s: float, displaced: bool = False) -> None:
        age = sub.age_s()
        if displaced:
            message = (f"display {sub.client_id} was {age:.1f} s behind and gave its slot to a live display "
                       f"({sub.dropped} overlays dropped); reconnect")
        else:
            log.warning("display %s (%s) fell behind: what it was to receive was %.1f s old, %d overlays dropped; "
                        "ending its stream", sub.client_id, sub.peer, age, sub.dropped)
            message = (f"display {sub.client_id} fell behind: what it was to receive was more than {limit_s:g} s old "
                       f"({sub.dropped} overlays dropped); reconnect")
        try:
            # The status goes out after what the display's transport still holds; don't wait for it.
            await asyncio.wait_for(context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message), timeout=1.0)
        except asyncio.TimeoutError:
            pass

    async def ReportProgress(self, request, context):
        await _reject_malformed(request, context)
        caller = await self._caller(context, request.client_id)
        sub = self.s.fanout.stream_of(caller.name, context.peer())
        if sub is None or not sub.reports_progress:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"display {caller.name} has no overlay stream subscribed with reports_progress here")
        try:
            sub.report_shown(request.stream_position)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ProgressAck(behind_s=round(sub.age_s(), 3), limit_s=self.s.config.server.behind_limit_s)

    async def StreamAlerts(self, request, context):
        await _reject_malformed(request, context)
        caller = await self._caller(context, request.client_id)
        cursor = request.after_sequence
        instance = self.s.alerts.instance
        changed = bool(request.agent_instance) and request.agent_instance != instance
        if changed:  # the client's numbering is another agent's: say so, then everything from the start
            cursor = 0
        elif cursor > self.s.alerts.last_sequence:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"after_sequence {cursor} is beyond the newest alert ({self.s.alerts.last_sequence}); "
                                "the agent restarted? resubscribe from 0")
        limit = self.s.config.server.max_subscribers
        if self.s.alert_streams >= limit:  # each stream costs the event loop: as many as overlay streams
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many alert streams (limit {limit})")
        self.s.alert_streams += 1
        try:
            if changed:
                yield pb.AlertEvent(kind=pb.AlertEvent.INSTANCE_CHANGED, agent_instance=instance,
                                    message=f"this is agent instance {instance}, not {loggable(request.agent_instance, 40)}: "
                                            "its alert numbering is its own; its history follows from the start",
                                    event_unix_ms=int(time.time() * 1000))
            async for event in self._alert_events(cursor, caller, context):
                yield event
        finally:
            self.s.alert_streams -= 1

    async def _alert_events(self, cursor: int, caller: Caller, context):
        generation = self.access.generation
        while not self.s.shutting_down:
            generation = await self._still_allowed(caller, context, generation)
            wakeup = self.s.fanout.alert_wakeup  # before reading: an event recorded after this sets it
            events, truncated = self.s.alerts.since(cursor)
            if truncated:
                yield pb.AlertEvent(sequence=cursor, kind=pb.AlertEvent.HISTORY_TRUNCATED, agent_instance=self.s.alerts.instance,
                                    message=f"alert history starts at {events[0].sequence if events else cursor + 1}; "
                                            "older events are gone", event_unix_ms=int(time.time() * 1000))
            for e in events:
                yield alert_to_pb(e, self.s.model_info, self.s.alerts.instance)
                cursor = e.sequence
            if self.s.alerts.last_sequence > cursor:
                continue
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    async def GetStatus(self, request, context):
        await _reject_malformed(request, context)
        await self._caller(context)
        return self.s.status()

    async def StartCase(self, request, context):
        await _reject_malformed(request, context)
        caller = await self._caller(context, role=START_STOP)
        try:
            # the allow-list first: a refused source is never looked at, so the answer is the same
            # whether or not it exists and whatever it is
            source = self.sources.admit(request.source)
        except SourceNotAllowed:
            log.warning("StartCase from %s refused: the source is not in [case] allowed_sources",
                        loggable(caller.name or context.peer()))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, NOT_ALLOWED)
        try:
            spec = CaseSpec(source, request.case_id, request.paced)
            session = await self.s.start_case(spec, by=caller.name)
        except OrAgentError as exc:
            # a source's own error names the path resolved; the caller is told the name it knows
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _public_error(str(exc), source))
        except RuntimeError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("case %s started on %s%s", spec.case_id, loggable(session.source_label), _by(caller))
        return case_info_to_pb(session)

    async def StopCase(self, request, context):
        await _reject_malformed(request, context)
        caller = await self._caller(context, role=START_STOP)
        session = await self.s.stop_case(by=caller.name)
        if session is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no case is running")
        log.info("case %s stopped (%s)%s", session.spec.case_id, loggable(request.reason) or "no reason given", _by(caller))
        return case_info_to_pb(session)

    async def AcknowledgeAlert(self, request, context):
        await _reject_malformed(request, context)
        caller = await self._caller(context, request.client_id, role=ACKNOWLEDGE)
        rec = self.s.alerts.acknowledge(request.alert_id, caller.name)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no active alert {request.alert_id[:80]!r}")
        return pb.AcknowledgeResponse(event=alert_to_pb(rec, self.s.model_info, self.s.alerts.instance))


def generic_handler(handlers: OrAgentHandlers) -> grpc.GenericRpcHandler:
    """Method handlers with a pass-through serializer for overlays already serialised once."""
    def out(m):
        return m if isinstance(m, (bytes, bytearray)) else m.SerializeToString()
    methods = {
        "StreamOverlays": grpc.unary_stream_rpc_method_handler(handlers.StreamOverlays, _tolerant(pb.SubscribeRequest.FromString), out),
        "StreamAlerts": grpc.unary_stream_rpc_method_handler(handlers.StreamAlerts, _tolerant(pb.AlertSubscribeRequest.FromString), out),
        "GetStatus": grpc.unary_unary_rpc_method_handler(handlers.GetStatus, _tolerant(pb.StatusRequest.FromString), out),
        "StartCase": grpc.unary_unary_rpc_method_handler(handlers.StartCase, _tolerant(pb.StartCaseRequest.FromString), out),
        "StopCase": grpc.unary_unary_rpc_method_handler(handlers.StopCase, _tolerant(pb.StopCaseRequest.FromString), out),
        "AcknowledgeAlert": grpc.unary_unary_rpc_method_handler(handlers.AcknowledgeAlert,
                                                                _tolerant(pb.AcknowledgeRequest.FromString), out),
        "ReportProgress": grpc.unary_unary_rpc_method_handler(handlers.ReportProgress,
                                                              _tolerant(pb.ProgressReport.FromString), out),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

