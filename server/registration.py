"""Register a generated gRPC service with request deserialisers that never raise.

grpc's own handling of bytes that do not parse as the method's request message (corrupt wire format, invalid
UTF-8 in a string field) happens before any servicer code and answers UNKNOWN ("Unexpected DecodeError"). A
caller's bad bytes are a bad argument, so here the deserialiser returns an `Undecodable` marker instead,
and the servicer's handler wrapper answers INVALID_ARGUMENT naming the message type. A valid message costs
one extra Python frame around the generated parser (the try block itself is free on Python 3.11).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from server.errors import InvalidArgument, RecommendationError


class Undecodable:
    """What a lenient deserialiser hands the handler for bytes that are not a message of the method's request type."""

    __slots__ = ("details",)

    def __init__(self, details: str) -> None:
        self.details = details  # "request body is not a valid propensity.v1.RecommendRequest: Wire format was corrupt"

    def __repr__(self) -> str:
        return f"Undecodable({self.details!r})"


def lenient(parse: Callable[[bytes], object], type_name: str) -> Callable[[bytes], object]:
    """`parse`, but bytes it refuses become an Undecodable naming `type_name` and the parser's reason."""
    prefix = f"request body is not a valid {type_name}: "

    def parse_or_mark(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as error:
            text = str(error)
            # protobuf says "Error parsing message with type 'X': <reason>"; the type is named once, in the prefix.
            return Undecodable(prefix + (text.rpartition(": ")[2] if text.startswith("Error parsing message") else text))

    return parse_or_mark


class _Captured:
    """Stands in for the server while the generated add_*_to_server function registers: keeps the handlers."""

    def __init__(self) -> None:
        self.services: dict[str, Mapping[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = handlers


def lenient_requests(
    add_generated: Callable[[object, object], None], service: ServiceDescriptor
) -> Callable[[object, grpc.aio.Server], None]:
    """The generated `add_<Service>Servicer_to_server`, every method's request deserialiser made lenient.

        lenient_requests(pb_grpc.add_RecommendationServiceServicer_to_server, pb.DESCRIPTOR.services_by_name["RecommendationService"])(servicer, server)

    The methods and their behaviours come from the generated function itself, so a method added to the .proto
    is covered without a change here; `service` (the descriptor) names each method's request type.
    """

    def add(servicer: object, server: grpc.aio.Server) -> None:
        captured = _Captured()
        add_generated(servicer, captured)
        handlers = {
            method: _with_deserializer(handler, lenient(handler.request_deserializer, service.methods_by_name[method].input_type.full_name))
            for method, handler in captured.services[service.full_name].items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        server.add_registered_method_handlers(service.full_name, handlers)

    return add


def _with_deserializer(handler: grpc.RpcMethodHandler, deserializer: Callable[[bytes], object]) -> grpc.RpcMethodHandler:
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary, deserializer, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(handler.unary_stream, deserializer, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(handler.stream_unary, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(handler.stream_stream, deserializer, serializer)


class UndecodableRequest(InvalidArgument):
    """A request (or a stream's message) whose bytes are not the method's request message: INVALID_ARGUMENT.

    No field to name: the message says which type and why (Undecodable.details).
    """

    def __init__(self, details: str) -> None:
        RecommendationError.__init__(self, details)
        self.field = ""
