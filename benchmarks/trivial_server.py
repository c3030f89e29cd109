"""The baseline of ``just bench``'s gRPC figures: a minimal grpcio server, no purerpc, no engine.

It serves ``joblet.JobService/GetJobStatus`` over the daemon's own mutual TLS certificates (the
client certificate is required and checked against the same CA) and answers every call with the
same constant ``GetJobStatusRes``: the serialised response the real daemon gave for a job, read
from stdin, so both servers put the same bytes on the wire. Every other RPC is UNIMPLEMENTED.

Usage (by ``benchmarks.run``): ``python -m benchmarks.trivial_server CERTS_DIR < response.bin``;
it prints ``port <n>`` once it listens on 127.0.0.1, and serves until SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from joblet.certs import CertPaths
from joblet.protocol import joblet_pb2 as pb
from joblet.protocol import joblet_pb2_grpc as pb_grpc

#: Handler threads: as many as the bench's most concurrent clients.
WORKERS = 16


class TrivialJobService(pb_grpc.JobServiceServicer):  # type: ignore[misc,unused-ignore]
    """GetJobStatus answers a constant response; nothing else is implemented."""

    def __init__(self, response: Any) -> None:
        self._response = response

    def GetJobStatus(self, request: Any, context: Any) -> Any:
        """The constant response, whatever the id."""
        return self._response


def main() -> None:
    """Serve until SIGTERM."""
    certs = CertPaths.in_dir(Path(sys.argv[1]))
    response = pb.GetJobStatusRes.FromString(sys.stdin.buffer.read())
    creds = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS))
    pb_grpc.add_JobServiceServicer_to_server(  # type: ignore[no-untyped-call]
        TrivialJobService(response), server
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print(f"port {port}", flush=True)
    stop.wait()
    server.stop(grace=1.0).wait()


if __name__ == "__main__":
    main()
