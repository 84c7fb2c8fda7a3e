"""Blocking client of the ``queryrewrite.v1.QueryRewrite`` gRPC service.

Plain dataclasses in and out (:class:`~rewrite.types.RewriteRequest` →
:class:`~rewrite.types.RewriteResult`), with the same contract as
:meth:`rewrite.rewriter.Rewriter.rewrite`, so callers such as the replay evaluator can take
either an in-process ``Rewriter.rewrite`` or ``RewriteClient.rewrite``.

Source: gRPC Python API (https://grpc.github.io/grpc/python/grpc.html) and the health
checking protocol (https://github.com/grpc/grpc/blob/master/doc/health-checking.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any, overload

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rewrite._pb.queryrewrite.v1 import rewrite_pb2
from rewrite.server import (
    REWRITE_METHOD,
    SERVICE_NAME,
    channel_options,
    request_to_proto,
    result_from_proto,
)
from rewrite.types import InvalidRequestError, RewriteRequest, RewriteResult

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024


@overload
def rewrite_stub(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryUnaryMultiCallable[rewrite_pb2.RewriteRequest, rewrite_pb2.RewriteResponse]: ...
@overload
def rewrite_stub(
    channel: grpc.Channel,
) -> grpc.UnaryUnaryMultiCallable[rewrite_pb2.RewriteRequest, rewrite_pb2.RewriteResponse]: ...
def rewrite_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """The ``Rewrite`` method on ``channel`` (blocking or ``grpc.aio``), taking a
    ``RewriteRequest`` proto and returning a ``RewriteResponse`` proto — the typed stub the
    generated ``rewrite_pb2_grpc.QueryRewriteStub`` would give (that module has no type
    stubs). For callers that want gRPC's own call objects and status codes rather than
    :class:`RewriteClient`'s dataclasses (load generators, contract tests)."""
    return channel.unary_unary(
        REWRITE_METHOD,
        request_serializer=rewrite_pb2.RewriteRequest.SerializeToString,
        response_deserializer=rewrite_pb2.RewriteResponse.FromString,
    )


class RewriteClient:
    """Client of one rewrite server.

    Args:
        target: gRPC target, e.g. ``"127.0.0.1:50051"``.
        timeout_s: deadline of each call, seconds (sent to the server as the gRPC deadline).
        max_message_bytes: max send/receive message size, bytes (match
            ``service.max_message_bytes``).
        options: more gRPC channel options, e.g. ``("grpc.use_local_subchannel_pool", 1)``
            for a connection of this client's own: channels with the same target and options
            share one connection otherwise, which matters when the service runs several
            processes on one port (:mod:`rewrite.processes`; connections are spread, not
            calls).

    The channel connects lazily on the first call. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        timeout_s: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            target, options=[*channel_options(max_message_bytes), *options]
        )
        self._rewrite = rewrite_stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def rewrite(self, request: RewriteRequest, timeout_s: float | None = None) -> RewriteResult:
        """Rewrite one utterance (or get it passed through).

        Args:
            request: the request.
            timeout_s: deadline of this call, seconds; default the client's ``timeout_s``.

        Returns:
            The server's :class:`RewriteResult` (``latency_ms`` is the server-side Rewriter
            time, milliseconds).

        Raises:
            InvalidRequestError: the server answered ``INVALID_ARGUMENT`` (its message kept).
            grpc.RpcError: any other failure (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ...);
                ``.code()`` and ``.details()`` tell which.
        """
        try:
            response = self._rewrite(
                request_to_proto(request),
                timeout=self.timeout_s if timeout_s is None else timeout_s,
            )
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(e.details()) from e
            raise
        return result_from_proto(response)

    def health(self, service: str = SERVICE_NAME, timeout_s: float | None = None) -> str:
        """The server's health status for ``service`` (default the rewrite service).

        Returns:
            ``"SERVING"``, ``"NOT_SERVING"``, ``"SERVICE_UNKNOWN"`` or ``"UNKNOWN"``.

        Raises:
            grpc.RpcError: the server is unreachable or does not know ``service``
                (``NOT_FOUND``).
        """
        response = self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=self.timeout_s if timeout_s is None else timeout_s,
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def close(self) -> None:
        """Close the channel (idempotent)."""
        self._channel.close()

    def __enter__(self) -> RewriteClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
