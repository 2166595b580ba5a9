"""``quotient-probe``: exit 0 when the local server's health is SERVING, 1 otherwise.

For container HEALTHCHECKs and exec probes. It asks ``grpc.health.v1`` on
``127.0.0.1:$QUOTIENT_HEALTH_PORT`` when that plaintext health port is set, else on
``127.0.0.1:$QUOTIENT_PORT`` (plaintext; a TLS-only server needs the health port, since a probe
holds no client certificate).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["main"]


def _default_target() -> str | None:
    health_port = os.environ.get("QUOTIENT_HEALTH_PORT", "0")
    if health_port not in ("", "0"):
        return f"127.0.0.1:{health_port}"
    if os.environ.get("QUOTIENT_TLS_CERT_FILE"):
        return None
    return f"127.0.0.1:{os.environ.get('QUOTIENT_PORT', '50051')}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quotient-probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="host:port (default: from QUOTIENT_HEALTH_PORT/PORT)")
    parser.add_argument("--service", default="", help="service name; '' is the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    target = args.target or _default_target()
    if target is None:
        print(
            "quotient-probe: the server serves TLS only: set QUOTIENT_HEALTH_PORT", file=sys.stderr
        )
        return 2
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"quotient-probe: {target}: {err.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"quotient-probe: {target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
