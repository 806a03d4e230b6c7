"""Who is calling, and may they: a bearer token or an mTLS identity becomes a caller with roles, checked per RPC.

One interceptor does both steps. Like Ray's, it wraps the real handler so the check runs inside the
call, where the peer's certificate is visible and `context.abort` gives the client a proper status:
missing or bad credentials -> UNAUTHENTICATED, a known caller without the role -> PERMISSION_DENIED.
Health is public; every method not in the policy is denied.

Tokens are stored only as sha256 hashes (they are long random strings, so a fast hash is enough and
keeps the check cheap on the request path). Make a token and its settings entry with:

    python -m server.auth new-token shop-frontend --roles read
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import secrets
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import grpc

from propensity.settings import CallerSettings, Settings

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # presented nothing
UNKNOWN = "unknown"  # presented a token or certificate that matches no caller
ANY_CALLER = "*"  # policy value: any authenticated caller
_SERVICE = "/propensity.v1.RecommendationService/"
DEFAULT_POLICY: Mapping[str, frozenset[str] | str] = {
    _SERVICE + "Recommend": frozenset({"read"}),
    _SERVICE + "ScoreUsers": frozenset({"read"}),
    _SERVICE + "ScoreItems": frozenset({"read"}),
    _SERVICE + "GetModelInfo": frozenset({"read"}),
    _SERVICE + "IngestEvents": frozenset({"ingest"}),
    _SERVICE + "ForgetUsers": frozenset({"admin"}),
    # The schema is not secret, but whoever enumerates it should be someone we know.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY_CALLER,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ANY_CALLER,
}
PUBLIC_SERVICES = frozenset({"grpc.health.v1.Health"})  # load balancers and probes carry no credentials
_RELOAD_CHECK_SECONDS = 1.0

caller_var: ContextVar[str] = ContextVar("caller", default="")


def current_caller() -> str:
    """The authenticated caller of the RPC this code runs for, or "" outside one (or with auth off)."""
    return caller_var.get()


def hash_token(token: str) -> str:
    """The form in which a bearer token is stored: sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def auth_enabled(settings: Settings) -> bool:
    """security.auth 'on'/'off', or 'auto': on unless the server binds loopback."""
    from server.tls import is_loopback

    mode = settings.security.auth
    return mode == "on" or (mode == "auto" and not is_loopback(settings.server.host))


@dataclass(frozen=True)
class Caller:
    name: str
    roles: frozenset[str]


class CallerTable:
    """Callers by token hash and by certificate name, from settings and an optional file re-read on change or `reload()`."""

    def __init__(self, callers: Iterable[CallerSettings] = (), callers_file: Path | None = None) -> None:
        self._inline = list(callers)
        self._file = callers_file
        self._lock = threading.Lock()
        self._reload_requested = False
        self._checked_at = time.monotonic()
        self._file_signature = self._stat()
        self._by_token, self._by_subject, self.names = self._build(self._inline + self._read_file())

    @classmethod
    def from_settings(cls, settings: Settings) -> CallerTable:
        return cls(settings.security.callers, settings.security.callers_file)

    def reload(self) -> None:
        """Re-read the callers file at the next call (SIGHUP). Safe in a signal handler."""
        self._reload_requested = True

    def by_token(self, token: str) -> Caller | None:
        self._maybe_reload()
        digest = hash_token(token)
        caller = self._by_token.get(digest)
        # The dict lookup found a candidate by its hash; compare once more in constant time all the same.
        if caller is not None and hmac.compare_digest(digest, caller[0]):
            return caller[1]
        return None

    def by_subjects(self, subjects: Iterable[str]) -> Caller | None:
        self._maybe_reload()
        for subject in subjects:
            caller = self._by_subject.get(subject)
            if caller is not None:
                return caller
        return None

    def _maybe_reload(self) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        if not self._reload_requested and now - self._checked_at < _RELOAD_CHECK_SECONDS:
            return
        self._checked_at = now
        signature = self._stat()
        if signature == self._file_signature and not self._reload_requested:
            return
        with self._lock:
            try:
                self._by_token, self._by_subject, self.names = self._build(self._inline + self._read_file())
                log.info("callers reloaded from %s: %d known", self._file, len(self.names))
            except (OSError, ValueError) as error:
                log.warning("callers file %s not reloaded, previous callers kept: %s", self._file, type(error).__name__)
            self._file_signature, self._reload_requested = signature, False

    def _stat(self) -> tuple | None:
        try:
            stat = self._file.stat() if self._file else None
        except OSError:
            return None
        return stat and (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _read_file(self) -> list[CallerSettings]:
        if self._file is None:
            return []
        text = self._file.read_text()
        data = tomllib.loads(text) if self._file.suffix == ".toml" else json.loads(text)
        entries = data.get("callers", []) if isinstance(data, dict) else data
        return [CallerSettings.model_validate(entry) for entry in entries]

    @staticmethod
    def _build(callers: list[CallerSettings]) -> tuple[dict[str, tuple[str, Caller]], dict[str, Caller], frozenset[str]]:
        by_token: dict[str, tuple[str, Caller]] = {}
        by_subject: dict[str, Caller] = {}
        for entry in callers:
            if entry.name in (ANONYMOUS, UNKNOWN):
                raise ValueError(f"caller name {entry.name!r} is reserved")
            caller = Caller(entry.name, frozenset(entry.roles))
            if entry.token_sha256:
                digest = entry.token_sha256.strip().lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ValueError(f"caller {entry.name!r}: token_sha256 is not a sha256 hex digest")
                by_token[digest] = (digest, caller)
            for subject in entry.subjects:
                by_subject[subject] = caller
        return by_token, by_subject, frozenset(entry.name for entry in callers)


@dataclass(frozen=True)
class Decision:
    caller: str
    code: grpc.StatusCode | None  # None: allowed
    message: str = ""


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token of the call: None when there is no authorization header, "" when it is malformed."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value if isinstance(value, str) else "").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _peer_subjects(context: grpc.aio.ServicerContext) -> list[str]:
    """The verified client certificate's SAN entries, then its subject CN (empty without a client certificate)."""
    auth = context.auth_context() or {}
    names = [v.decode(errors="replace") for v in auth.get("x509_subject_alternative_name", ())]
    names += [v.decode(errors="replace") for v in auth.get("x509_common_name", ())]
    return names


def decide(table: CallerTable, policy: Mapping[str, frozenset[str] | str], method: str, token: str | None, subjects: list[str]) -> Decision:
    """Authenticate (token first, else certificate), then authorise against the method's roles."""
    if token is not None:
        caller = table.by_token(token) if token else None
        if caller is None:
            return Decision(UNKNOWN, grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
    else:
        caller = table.by_subjects(subjects)
        if caller is None:
            if subjects:
                return Decision(UNKNOWN, grpc.StatusCode.UNAUTHENTICATED, "client certificate does not identify a known caller")
            return Decision(ANONYMOUS, grpc.StatusCode.UNAUTHENTICATED,
                            "credentials required: send 'authorization: Bearer <token>' or a known client certificate")
    required = policy.get(method)
    if required is None:
        return Decision(caller.name, grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any caller")
    if required != ANY_CALLER and not caller.roles & required:
        return Decision(caller.name, grpc.StatusCode.PERMISSION_DENIED,
                        f"caller {caller.name!r} lacks a role for {method} (needs one of: {', '.join(sorted(required))})")
    return Decision(caller.name, None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticate and authorise every RPC except PUBLIC_SERVICES; set `current_caller()` for the handler's logs.

    observe(caller, method, code) is called once per checked RPC, e.g. Metrics.observe_caller.
    """

    def __init__(
        self,
        table: CallerTable,
        policy: Mapping[str, frozenset[str] | str] = DEFAULT_POLICY,
        observe: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.table = table
        self._policy = dict(policy)
        self._observe = observe or (lambda caller, method, code: None)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        service = method.lstrip("/").rpartition("/")[0]
        if handler is None or service in PUBLIC_SERVICES:
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        return _wrap(handler, self._checker(method, token))

    def _checker(self, method: str, token: str | None) -> Callable[[grpc.aio.ServicerContext], Awaitable[tuple[str, Callable[[str], None]]]]:
        short = method.rpartition("/")[2]

        async def check(context: grpc.aio.ServicerContext) -> tuple[str, Callable[[str], None]]:
            """Abort the call, or return the caller's name and the function that records the call's final code."""
            decision = decide(self.table, self._policy, method, token, _peer_subjects(context))

            def finish(code: str) -> None:
                try:
                    self._observe(decision.caller, short, code)
                except Exception:  # metrics must never fail a request
                    log.exception("recording the caller of %s failed", short)

            if decision.code is not None:
                log.warning("denied %s to %s: %s", short, decision.caller, decision.code.name, extra={"caller": decision.caller})
                finish(decision.code.name)
                await context.abort(decision.code, decision.message)
            return decision.caller, finish

        return check



def _failure_code(error: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status name a call that raised ends with, for the caller metric."""
    if isinstance(error, grpc.aio.AbortError):
        return (context.code() or grpc.StatusCode.UNKNOWN).name
    if isinstance(error, asyncio.CancelledError):  # the client went away or its deadline passed
        return "CANCELLED"
    return "UNKNOWN"

def _wrap(handler: grpc.RpcMethodHandler, check: Callable) -> grpc.RpcMethodHandler:
    """The same handler, with `check` run inside the call first, for all four arities."""

    async def unary(request_or_iterator: object, context: grpc.aio.ServicerContext, behavior: Callable) -> object:
        caller, finish = await check(context)
        reset = caller_var.set(caller)
        code = "OK"
        try:
            result = behavior(request_or_iterator, context)
            if inspect.isawaitable(result):
                result = await result
            code = (context.code() or grpc.StatusCode.OK).name
            return result
        except BaseException as error:
            code = _failure_code(error, context)
            raise
        finally:
            caller_var.reset(reset)
            finish(code)

    async def streaming(request_or_iterator: object, context: grpc.aio.ServicerContext, behavior: Callable) -> AsyncIterator[object]:
        caller, finish = await check(context)
        reset = caller_var.set(caller)
        code = "OK"
        try:
            responses = behavior(request_or_iterator, context)
            if hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            else:
                for response in responses:
                    yield response
        except BaseException as error:
            code = _failure_code(error, context)
            raise
        finally:
            caller_var.reset(reset)
            finish(code)

    # grpc.aio tells coroutines and async generators from plain functions by inspection: real `async def`s, no lambdas.
    serializers = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary or handler.stream_unary:
        behavior = handler.unary_unary or handler.stream_unary

        async def checked_unary(request_or_iterator: object, context: grpc.aio.ServicerContext) -> object:
            return await unary(request_or_iterator, context, behavior)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(checked_unary, **serializers)
    behavior = handler.unary_stream or handler.stream_stream

    async def checked_streaming(request_or_iterator: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        async for response in streaming(request_or_iterator, context, behavior):
            yield response

    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return make(checked_streaming, **serializers)


def install_caller_in_logs() -> None:
    """Stamp every log record written during an RPC with `caller` (JSON logs show it as a field). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_stamps_caller", False):
        return

    def stamped(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        caller = caller_var.get()
        if caller:
            record.caller = caller
        return record

    stamped._stamps_caller = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(stamped)


def build_interceptor(settings: Settings, observe: Callable[[str, str, str], None] | None = None) -> AuthInterceptor | None:
    """The interceptor the settings ask for, or None when auth is off; refuses auth with no caller configured."""
    if not auth_enabled(settings):
        return None
    table = CallerTable.from_settings(settings)
    if not table.names:
        log.warning("auth is on but no callers are configured (security.callers, security.callers_file): every RPC but health is refused")
    install_caller_in_logs()
    return AuthInterceptor(table, observe=observe)


def main(argv: list[str] | None = None) -> int:
    """`python -m server.auth new-token NAME --roles read,ingest`: print a fresh token and its settings entry."""
    parser = argparse.ArgumentParser(prog="python -m server.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-token", help="make a random bearer token and the hashed entry for security.callers")
    new.add_argument("name")
    new.add_argument("--roles", default="read", help="comma-separated roles (read, ingest, admin)")
    args = parser.parse_args(argv)
    token = secrets.token_urlsafe(32)
    entry = {"name": args.name, "roles": [r for r in args.roles.split(",") if r], "token_sha256": hash_token(token)}
    print(f"token (give it to the caller; it is not stored anywhere): {token}")
    print(f"entry for security.callers / the callers file: {json.dumps(entry)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
