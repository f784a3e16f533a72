"""The ZeroMQ door: a ROUTER front thread, a pool of worker threads, an optional PUB for progress.

Threads and sockets (each socket lives in exactly one thread; ZeroMQ sockets are not thread-safe):

* front ("ipc-front"): owns the ROUTER bound at ``settings.zmq_endpoint`` and the inproc PULL that
  collects workers' replies. It splits the envelope, enforces the size limits, parses small
  messages, answers protocol errors and ``health`` itself (so health never waits behind a fit),
  and queues every other request.
* workers ("ipc-worker-N", ``settings.zmq_workers`` of them): take a request from the queue,
  validate its args against the Engine method's signature, call the engine, and push the packed
  reply back to the front over inproc.
* events ("ipc-events", only with ``settings.zmq_events``): owns the PUB socket; progress
  callbacks from the workers, and the engine's drift state changes, reach it through a queue.

The server translates messages to engine calls and nothing else; the wire format is in
``ipc.protocol`` and docs/ipc.md.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import queue
import threading
import time
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import zmq
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from structlog.contextvars import bound_contextvars

from engine.errors import EngineError, InvalidImage, PayloadTooLarge, Unauthorized
from engine.limits import ValueRefused
from engine.logs import LogThrottle
from ipc.backpressure import PeerLedger
from ipc.protocol import OPS, PROTOCOL_VERSION, UnpackLimits, image_from_wire, pack, peek_envelope, unpack
from ipc.settings import IpcSettings

if TYPE_CHECKING:
    from engine.api import Engine

__all__ = ["IpcServer"]

log = structlog.get_logger("ipc")

_INLINE_PARSE_MAX = 64 * 1024      # the front parses messages up to this size to spot health
_QUEUE_PER_WORKER = 16             # queued requests per worker before "server_busy"
_POLL_MS = 50                      # front loop wake-up, bounds how fast stop() is noticed
_SWEEP_S = 1.0                     # how often the front forgets clients that owe nothing
_TRACK_MIN_BYTES = 64 * 1024       # replies from this size on are tracked until libzmq has sent them
_REQUEST_KEYS = frozenset({"v", "op", "id", "api_key", "args"})
# args holding images: a raw buffer map becomes an ndarray before validation (True = a list of them)
_IMAGE_ARGS: dict[str, tuple[str, bool]] = {"infer": ("image", False), "fit_ok": ("images", True),
                                             "add_ok": ("images", True)}
_STRICT = ConfigDict(arbitrary_types_allowed=True, strict=True)   # msgpack types only, no "1.5" -> 1.5
# list args counted before their items are converted or validated: (op, arg) -> engine setting
_LIST_LIMITS = {("fit_ok", "images"): "max_fit_images", ("infer_batch", "items"): "max_batch_items",
                ("calibrate_ng", "ok_scores"): "max_scores", ("calibrate_ng", "ng_scores"): "max_scores",
                ("add_ok", "images"): "max_fit_images"}


class _Rejection(Exception):
    """A request refused by the door itself (not by the engine)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _Job:
    envelope: list[bytes]
    frame: zmq.Frame
    msg: dict[str, Any] | None          # already parsed by the front, when small


@dataclass(frozen=True)
class _OpSpec:
    method: Any
    signature: inspect.Signature
    adapters: dict[str, TypeAdapter[Any]]
    takes_progress: bool


def _is_local(endpoint: str) -> bool:
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:           # "*", an interface name, a host name
        return False


# what a client of this door does about an engine error, added to the engine's message
_HINTS = {"model_not_found": "op fit_ok", "calibration_missing": "op calibrate_ng or calibrate_dataset"}


def _error_reply(req_id: Any, status: int, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "status": status,
            "error": {"code": code, "message": message}}


def _engine_error_reply(req_id: Any, exc: EngineError) -> dict[str, Any]:
    hint = _HINTS.get(exc.code)
    return _error_reply(req_id, exc.status, exc.code, f"{exc.message} ({hint})" if hint else exc.message)


def _log_context(req_id: Any, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """What every log line of this request carries: its id, op, and the model it names."""
    context: dict[str, Any] = {"request_id": None if req_id is None else str(req_id), "op": op}
    for name in ("role_id", "roi_id"):
        if isinstance(args.get(name), str):
            context[name] = args[name]
    return context


def _to_result(value: Any) -> dict[str, Any]:
    """An Engine return value as the reply's ``result`` map."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python")
    if isinstance(value, dict):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"data": bytes(value)}
    if isinstance(value, (list, tuple)):
        return {"items": [v.model_dump(mode="python") if isinstance(v, BaseModel) else v for v in value]}
    if value is None:
        return {}
    raise TypeError(f"engine returned a {type(value).__name__}, which has no wire form")


def _describe(exc: ValidationError, name: str) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        loc = ".".join(str(p) for p in (name, *err["loc"]))
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class IpcServer:
    """Serves one Engine over ZeroMQ (msgpack maps, protocol v1) until ``stop()``."""

    def __init__(self, engine: Engine, settings: IpcSettings) -> None:
        self._engine = engine
        self._settings = settings
        key = settings.api_key
        self._api_key = key.get_secret_value().encode() if key is not None else None
        self._max_request = min(settings.max_request_bytes, settings.zmq_max_message_bytes)
        self._limits = UnpackLimits(max_container_len=settings.zmq_max_container_len,
                                    max_items=settings.zmq_max_items, max_depth=settings.zmq_max_depth)
        self._ledger = self._new_ledger()
        self._drops = LogThrottle()
        self._specs = {op: self._spec(op) for op in OPS}
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._endpoint: str | None = None
        self._events_endpoint: str | None = None
        self._results_addr = f"inproc://ipc-results-{id(self):x}"
        self._jobs: queue.Queue[_Job | None] = queue.Queue(_QUEUE_PER_WORKER * settings.zmq_workers)
        self._events: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._stop_deadline = 0.0
        self._front: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._publisher: threading.Thread | None = None
        self._unsubscribe: Any = None

    # -- public --------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The endpoint actually bound (a ``*`` or 0 port resolved); RuntimeError before start()."""
        if self._endpoint is None:
            raise RuntimeError("IpcServer is not started")
        return self._endpoint

    @property
    def events_endpoint(self) -> str | None:
        """The bound PUB endpoint for progress events, or None when events are off."""
        return self._events_endpoint

    def start(self) -> None:
        """Bind the sockets and spawn the threads; returns at once.

        Raises:
            ValueError: a non-loopback endpoint without ``settings.allow_remote``.
            OSError: an endpoint cannot be bound (in use, bad path).
        """
        if self._ctx is not None:
            raise RuntimeError("IpcServer already started")
        endpoints = [self._settings.zmq_endpoint]
        if self._settings.zmq_events:
            endpoints.append(self._settings.zmq_events)
        for ep in endpoints:
            self._check_bind_allowed(ep)

        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sockets: list[zmq.Socket[bytes]] = []
        try:
            router = ctx.socket(zmq.ROUTER)
            sockets.append(router)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.MAXMSGSIZE, self._settings.zmq_max_message_bytes)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a gone client raises instead of a silent drop
            router.setsockopt(zmq.SNDHWM, self._settings.zmq_sndhwm)
            self._endpoint = self._bind(router, self._settings.zmq_endpoint)
            results = ctx.socket(zmq.PULL)
            sockets.append(results)
            results.setsockopt(zmq.LINGER, 0)
            results.bind(self._results_addr)
            pub = None
            if self._settings.zmq_events:
                pub = ctx.socket(zmq.PUB)
                sockets.append(pub)
                pub.setsockopt(zmq.LINGER, 0)
                self._events_endpoint = self._bind(pub, self._settings.zmq_events)
        except BaseException:
            for s in sockets:
                s.close(linger=0)
            ctx.term()
            self._endpoint = self._events_endpoint = None
            raise

        self._ctx = ctx
        self._stopping.clear()
        self._jobs = queue.Queue(_QUEUE_PER_WORKER * self._settings.zmq_workers)
        self._events = queue.SimpleQueue()
        self._ledger = self._new_ledger()
        # sockets bound here move to their one owning thread; Thread.start() is the memory barrier
        self._workers = [
            threading.Thread(target=self._work, name=f"ipc-worker-{i}", daemon=True)
            for i in range(self._settings.zmq_workers)
        ]
        self._front = threading.Thread(target=self._serve, args=(router, results), name="ipc-front", daemon=True)
        if pub is not None:
            self._start_events(pub)
        for t in self._workers:
            t.start()
        self._front.start()
        log.info("zmq_listening", endpoint=self._endpoint, events=self._events_endpoint, workers=len(self._workers))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let running ones finish (up to ``timeout`` s), close, join.

        Requests still queued (not started) are answered 503 ``shutting_down``.
        """
        if self._ctx is None:
            return
        deadline = time.monotonic() + timeout
        self._stop_deadline = deadline
        self._stopping.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        threads = [t for t in (self._front, *self._workers) if t is not None]
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._publisher is not None:
            self._events.put(None)
            self._publisher.join(max(0.5, deadline - time.monotonic()))
            threads.append(self._publisher)
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            # a worker still inside a long engine call: its socket keeps the context open
            log.warning("zmq_stopped_with_threads_running", threads=alive)
        else:
            self._ctx.term()
        self._ctx = None
        self._front, self._workers, self._publisher = None, [], None
        log.info("zmq_stopped", endpoint=self._endpoint)

    # -- set-up helpers ------------------------------------------------------------------------

    def _new_ledger(self) -> PeerLedger:
        s = self._settings
        # one client may hold at most half of the request queue: others keep a way in
        max_pending = min(s.zmq_peer_max_pending, max(1, _QUEUE_PER_WORKER * s.zmq_workers // 2))
        return PeerLedger(max_pending=max_pending, max_unread_bytes=s.zmq_peer_max_unread_bytes,
                          max_inflight_bytes=s.zmq_max_inflight_bytes)

    def _check_bind_allowed(self, endpoint: str) -> None:
        if _is_local(endpoint):
            return
        if not self._settings.allow_remote:
            raise ValueError(
                f"refusing to bind {endpoint!r}: not a loopback address. Set BACKEND_ALLOW_REMOTE=true "
                "(settings.allow_remote) to accept clients from other machines."
            )
        log.warning("zmq_remote_bind", endpoint=endpoint, api_key_set=self._api_key is not None,
                    note="reachable from other machines")

    @staticmethod
    def _bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise OSError(exc.errno, f"cannot bind {endpoint}: {exc}") from exc
        bound = sock.getsockopt(zmq.LAST_ENDPOINT)
        return bound.decode() if isinstance(bound, bytes) else str(bound)

    def _spec(self, op: str) -> _OpSpec:
        part = OPS[op].part
        method = getattr(getattr(self._engine, part) if part else self._engine, op)
        signature = inspect.signature(method)
        hints = typing.get_type_hints(method, include_extras=True)
        adapters = {
            name: TypeAdapter(hints.get(name, Any), config=_STRICT)
            for name in signature.parameters
            if name != "progress"
        }
        return _OpSpec(method, signature, adapters, "progress" in signature.parameters)

    # -- front thread --------------------------------------------------------------------------

    def _serve(self, router: zmq.Socket[bytes], results: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        accepting = True
        next_sweep = time.monotonic() + _SWEEP_S
        try:
            while True:
                ready = dict(poller.poll(_POLL_MS))
                if time.monotonic() > next_sweep:
                    self._ledger.sweep()
                    next_sweep = time.monotonic() + _SWEEP_S
                if results in ready:
                    self._forward_results(router, results)
                if accepting and router in ready:
                    for _ in range(64):          # a bounded batch, so replies are not starved
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_request(router, frames)
                if accepting and self._stopping.is_set():
                    accepting = False
                    poller.unregister(router)
                    self._reject_queued(router)
                    for _ in self._workers:
                        self._jobs.put(None)
                if not accepting and (
                    not any(w.is_alive() for w in self._workers) or time.monotonic() > self._stop_deadline
                ):
                    self._forward_results(router, results)
                    break
        except Exception:
            log.exception("zmq_front_failed", note="the ZeroMQ door is down")
        finally:
            router.close(linger=0)
            results.close(linger=0)

    def _forward_results(self, router: zmq.Socket[bytes], results: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # a worker's reply: [request size, *envelope, payload]
            self._ledger.answered(frames[1], int.from_bytes(frames[0], "little"))
            self._send(router, frames[1:-1], frames[-1])

    def _send(self, router: zmq.Socket[bytes], envelope: list[bytes], payload: bytes) -> None:
        peer, large = envelope[0], len(payload) >= _TRACK_MIN_BYTES
        if large and not self._ledger.may_send(peer):
            self._dropped("the client does not read its replies")
            return
        try:
            if large:
                tracker = router.send_multipart([*envelope, payload], zmq.NOBLOCK, copy=False, track=True)
                self._ledger.sent(peer, tracker, len(payload))
            else:
                router.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.Again:
            self._dropped("the client's queue is full (ZMQ_SNDHWM)")
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            log.debug("zmq_reply_dropped", reason="the client disconnected before it came")

    def _dropped(self, reason: str) -> None:
        skipped = self._drops.due()      # a client that never reads would otherwise flood the log
        if skipped is not None:
            log.warning("zmq_reply_dropped", reason=reason, dropped_since_last_line=skipped)

    def _on_request(self, router: zmq.Socket[bytes], frames: list[zmq.Frame]) -> None:
        # ROUTER prefixes the peer identity; a REQ peer adds an empty delimiter, a DEALER may not
        cut = next((i for i in range(1, len(frames)) if len(frames[i]) == 0), 0)
        envelope = [f.bytes for f in frames[: cut + 1]]
        body = frames[cut + 1:]
        if len(body) != 1:
            self._reply(router, envelope, _error_reply(
                None, 400, "malformed_message", f"expected one message frame, got {len(body)}"))
            return
        frame = body[0]
        if len(frame) > self._max_request:      # below the socket cap (MAXMSGSIZE), so answerable
            self._reply(router, envelope, _error_reply(None, PayloadTooLarge.status, PayloadTooLarge.code, (
                f"message of {len(frame)} bytes exceeds the limit of {self._max_request}")))
            return
        msg = None
        if len(frame) <= _INLINE_PARSE_MAX:
            try:
                msg = self._parse(frame)
                req_id, op, args = self._check(msg)
            except _Rejection as exc:
                self._reply(router, envelope, _error_reply(_msg_id(msg), exc.status, exc.code, exc.message))
                return
            if op == "health":
                self._reply(router, envelope, self._execute(req_id, op, args))
                return
        refusal = self._ledger.admit(envelope[0], len(frame))
        if refusal is not None:
            self._reply(router, envelope, _error_reply(_msg_id(msg), 503, "server_busy", f"{refusal}; retry later"))
            return
        try:
            self._jobs.put_nowait(_Job(envelope, frame, msg))
        except queue.Full:
            self._ledger.answered(envelope[0], len(frame))
            self._reply(router, envelope, _error_reply(
                _msg_id(msg), 503, "server_busy", "too many queued requests; retry later"))

    def _reply(self, router: zmq.Socket[bytes], envelope: list[bytes], reply: dict[str, Any]) -> None:
        self._send(router, envelope, self._pack(reply))

    def _reject_queued(self, router: zmq.Socket[bytes]) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._ledger.answered(job.envelope[0], len(job.frame))
                self._reply(router, job.envelope, _error_reply(
                    _msg_id(job.msg), 503, "shutting_down", "the engine is shutting down"))

    # -- request handling (front for health, workers for the rest) ----------------------------

    def _parse(self, frame: zmq.Frame) -> dict[str, Any]:
        try:
            msg = unpack(frame.buffer, self._limits)
        except ValueRefused as exc:
            if exc.too_large:
                raise _Rejection(PayloadTooLarge.status, PayloadTooLarge.code, str(exc)) from None
            raise _Rejection(400, "malformed_message", str(exc)) from None
        except ValueError as exc:
            raise _Rejection(400, "malformed_message", str(exc)) from None
        if not isinstance(msg, dict):
            raise _Rejection(400, "malformed_message", f"a request is a msgpack map, got {type(msg).__name__}")
        return msg

    def _check(self, msg: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
        """(id, op, args) of a parsed request; _Rejection for anything the engine need not see."""
        version = msg.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:     # not true, not 1.0
            raise _Rejection(400, "unsupported_version", f"protocol version {version!r} is not supported; "
                             f"this server speaks v{PROTOCOL_VERSION} (the integer {PROTOCOL_VERSION})")
        self._authenticate(msg)
        if not isinstance(msg.get("id"), str | None):
            raise _Rejection(400, "malformed_message", "id must be a string")
        extra = set(msg) - _REQUEST_KEYS
        if extra:
            raise _Rejection(400, "malformed_message", f"unknown request keys: {', '.join(sorted(map(str, extra)))}")
        op = msg.get("op")
        if not isinstance(op, str) or op not in OPS:
            raise _Rejection(400, "unknown_op", f"unknown op {op!r}; ops: {', '.join(OPS)}")
        args = msg.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise _Rejection(400, "invalid_args", f"args must be a map, got {type(args).__name__}")
        return msg.get("id"), op, args

    def _authenticate(self, msg: dict[str, Any]) -> None:
        """_Rejection 401 unless the server has no key or ``msg`` carries it (constant-time compare)."""
        if self._api_key is None:
            return
        given = msg.get("api_key")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self._api_key):
            raise _Rejection(Unauthorized.status, Unauthorized.code, "missing or wrong api_key")

    def _bind_args(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        spec = self._specs[op]
        if not all(isinstance(k, str) for k in args):
            raise _Rejection(400, "invalid_args", "arg names must be strings")
        if "progress" in args:
            raise _Rejection(400, "invalid_args", "progress is not an arg: subscribe to the events endpoint")
        try:
            spec.signature.bind(**args)
        except TypeError as exc:
            raise _Rejection(400, "invalid_args", f"{op}: {exc}") from None
        self._count_lists(op, args)
        if op in _IMAGE_ARGS:
            name, many = _IMAGE_ARGS[op]
            if name in args:
                value = args[name]
                if many and isinstance(value, list):
                    args = {**args, name: [image_from_wire(v) for v in value]}
                elif not many:
                    args = {**args, name: image_from_wire(value)}
        if op == "infer_batch" and isinstance(args.get("items"), list):
            args = {**args, "items": [
                {**item, "image": _item_image(item["image"])}
                if isinstance(item, dict) and "image" in item else item
                for item in args["items"]]}
        kwargs = {}
        for name, value in args.items():
            adapter = spec.adapters.get(name)        # absent only for a **kwargs catch-all
            try:
                kwargs[name] = value if adapter is None else adapter.validate_python(value)
            except ValidationError as exc:
                raise _Rejection(400, "invalid_args", f"{op}: {_describe(exc, name)}") from None
        return kwargs

    def _count_lists(self, op: str, args: dict[str, Any]) -> None:
        """413 for a list arg over the engine's limit, before any of its items costs work."""
        for (limited_op, name), setting in _LIST_LIMITS.items():
            value = args.get(name) if op == limited_op else None
            limit = getattr(self._engine.settings, setting)
            if isinstance(value, list) and len(value) > limit:
                raise _Rejection(PayloadTooLarge.status, PayloadTooLarge.code,
                                 f"{name} holds {len(value)} items; the limit is {limit} ({setting})")

    def _execute(self, req_id: Any, op: str, args: dict[str, Any]) -> dict[str, Any]:
        with bound_contextvars(**_log_context(req_id, op, args)):
            return self._call(req_id, op, args)

    def _call(self, req_id: Any, op: str, args: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            kwargs = self._bind_args(op, args)
            spec = self._specs[op]
            if spec.takes_progress and self._events_endpoint is not None:
                kwargs["progress"] = self._progress_fn(op, req_id, kwargs)
            reply = {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": _to_result(spec.method(**kwargs))}
        except _Rejection as exc:
            reply = _error_reply(req_id, exc.status, exc.code, exc.message)
        except EngineError as exc:
            reply = _engine_error_reply(req_id, exc)
        except Exception as exc:
            log.exception("zmq_op_failed")
            reply = _error_reply(req_id, 500, "internal_error", f"{type(exc).__name__} (see the engine log)")
        log.info("zmq_request", status=200 if reply["ok"] else reply["status"],
                 ms=round((time.perf_counter() - start) * 1e3, 3))
        return reply

    def _pack(self, reply: dict[str, Any]) -> bytes:
        try:
            return pack(reply)
        except Exception as exc:
            log.exception("zmq_reply_unpackable", request_id=reply.get("id"))
            return pack(_error_reply(reply.get("id"), 500, "internal_error",
                                     f"reply not serializable: {type(exc).__name__}"))

    def _progress_fn(self, op: str, req_id: Any, kwargs: dict[str, Any]) -> Any:
        events = self._events

        def progress(stage: str, done: int, total: int) -> None:
            events.put({"v": PROTOCOL_VERSION, "op": op, "id": req_id, "role_id": kwargs.get("role_id"),
                        "roi_id": kwargs.get("roi_id"), "stage": str(stage), "done": int(done),
                        "total": int(total)})

        return progress

    def _start_events(self, pub: zmq.Socket[bytes]) -> None:
        """The publisher thread, fed by progress callbacks and the engine's drift state changes."""
        self._publisher = threading.Thread(target=self._publish, args=(pub,), name="ipc-events", daemon=True)
        self._publisher.start()
        self._unsubscribe = self._engine.monitor.subscribe(self._drift_event)

    def _drift_event(self, event: dict[str, Any]) -> None:
        """A drift state change as a progress event (stage ``drift_state``; done/total: the
        window's scores and its size)."""
        self._events.put({"v": PROTOCOL_VERSION, "op": "drift", "id": event.get("request_id"),
                          "role_id": event["role_id"], "roi_id": event["roi_id"], "stage": "drift_state",
                          "done": int(event["n_window"]), "total": int(event["window"]),
                          **{k: event[k] for k in ("recipe_id", "model_version", "state", "previous", "reason",
                                                   "ks_d", "ks_p", "time")}})

    # -- worker and publisher threads ----------------------------------------------------------

    def _work(self) -> None:
        assert self._ctx is not None
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)   # inproc to our own front; lets the last reply through
        push.connect(self._results_addr)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                try:
                    payload = self._pack(self._handle(job))
                except Exception:            # never lose the worker, never leave a client without reply
                    log.exception("zmq_worker_failed")
                    payload = pack(_error_reply(None, 500, "internal_error", "worker failure"))
                try:
                    push.send_multipart([len(job.frame).to_bytes(8, "little"), *job.envelope, payload], zmq.NOBLOCK)
                except zmq.Again:            # the front is gone (stop timed out): nobody to answer
                    log.warning("zmq_reply_dropped", reason="the door is closed")
        finally:
            push.close()

    def _handle(self, job: _Job) -> dict[str, Any]:
        msg = job.msg
        try:
            if msg is None:
                self._authenticate_early(job.frame)
                msg = self._parse(job.frame)
            req_id, op, args = self._check(msg)
        except _Rejection as exc:
            return _error_reply(_msg_id(msg), exc.status, exc.code, exc.message)
        return self._execute(req_id, op, args)

    def _authenticate_early(self, frame: zmq.Frame) -> None:
        """Refuse a wrong key read from the message's head, before a large ``args`` is unpacked
        (the Python client puts ``api_key`` before ``args``; a key after them is checked after)."""
        if self._api_key is None:
            return
        head = peek_envelope(frame.buffer)
        if "api_key" in head:
            self._authenticate(head)

    def _publish(self, pub: zmq.Socket[bytes]) -> None:
        try:
            while True:
                event = self._events.get()
                if event is None:
                    return
                try:
                    pub.send(pack(event), zmq.NOBLOCK)
                except zmq.Again:
                    pass                     # PUB drops at its high-water mark; so do we
                except Exception:
                    log.exception("zmq_event_not_published")
        finally:
            pub.close(linger=0)


def _msg_id(msg: Any) -> Any:
    """The request id to echo, when the message got far enough to have a usable one."""
    if isinstance(msg, dict):
        rid = msg.get("id")
        if isinstance(rid, str):
            return rid
    return None


def _item_image(value: Any) -> Any:
    """A batch item's image as the engine takes it; a raw buffer the door cannot read becomes its
    ``InvalidImage``, which fails that item alone (the engine raises it when it reaches the item)."""
    try:
        return image_from_wire(value)
    except InvalidImage as exc:
        return exc
