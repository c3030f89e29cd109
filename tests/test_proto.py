"""The generated gRPC code: field numbers as the spec fixes them, both stub flavours, real calls."""

from __future__ import annotations

import gc
import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import anyio.abc
import grpc
import purerpc
import purerpc.client
import pytest
import trio
from google.protobuf import descriptor as _d
from google.protobuf.message import DecodeError
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.server import ConnectionHandler

from joblet.core.model import JobInfo, JobSpec, JobStatus, Limits, RunRequest
from joblet.protocol import joblet_grpc, joblet_pb2_grpc, persist_grpc
from joblet.protocol import joblet_pb2 as pb
from joblet.protocol import persist_pb2 as persist_pb
from joblet.rpc import convert
from tools import gen_proto as gen

STR, BYTES = _d.FieldDescriptor.TYPE_STRING, _d.FieldDescriptor.TYPE_BYTES
I32, I64 = _d.FieldDescriptor.TYPE_INT32, _d.FieldDescriptor.TYPE_INT64
MSG, BOOL = _d.FieldDescriptor.TYPE_MESSAGE, _d.FieldDescriptor.TYPE_BOOL
MAP = "map"
REP = "repeated"

# (name, number, type, repeated?) as the spec lists them (000/001, shared/spec/README.md).
SPEC_JOB = [
    ("id", 1, STR, False),
    ("name", 2, STR, False),
    ("command", 3, STR, False),
    ("args", 4, STR, True),
    ("maxCPU", 5, I32, False),
    ("cpuCores", 6, STR, False),
    ("maxMemory", 7, I32, False),
    ("maxIOBPS", 8, I32, False),
    ("status", 9, STR, False),
    ("startTime", 10, STR, False),
    ("endTime", 11, STR, False),
    ("exitCode", 12, I32, False),
    ("scheduledTime", 13, STR, False),
    ("runtime", 14, STR, False),
    ("environment", 15, MAP, True),
    ("secret_environment", 16, MAP, True),
    ("nodeId", 20, STR, False),
]
SPEC_RUN_JOB_REQ = [
    ("command", 1, STR, False),
    ("args", 2, STR, True),
    ("maxCPU", 3, I32, False),
    ("maxMemory", 4, I32, False),
    ("maxIOBPS", 5, I32, False),
]
SPEC_STATUS_RES = [
    ("uuid", 1, STR, False),
    ("name", 2, STR, False),
    ("command", 3, STR, False),
    ("args", 4, STR, True),
    ("maxCPU", 5, I32, False),
    ("cpuCores", 6, STR, False),
    ("maxMemory", 7, I32, False),
    ("maxIOBPS", 8, I64, False),
    ("status", 9, STR, False),
    ("startTime", 10, STR, False),
    ("endTime", 11, STR, False),
    ("exitCode", 12, I32, False),
    ("scheduledTime", 13, STR, False),
    ("runtime", 14, STR, False),
    ("environment", 15, MAP, True),
    ("secret_environment", 16, MAP, True),
    ("network", 17, STR, False),
    ("volumes", 18, STR, True),
    ("workDir", 19, STR, False),
    ("uploads", 20, MSG, True),
    ("dependencies", 21, STR, True),
    ("workflowUuid", 22, STR, False),
    ("gpuCount", 23, I32, False),
    ("gpuIndices", 24, I32, True),
    ("gpuMemoryMB", 25, I64, False),
    ("nodeId", 26, STR, False),
]
SPEC_STOP_RES = [
    ("id", 1, STR, False),
    ("status", 2, STR, False),
    ("endTime", 3, STR, False),
    ("exitCode", 4, I32, False),
]
SPEC_WORKFLOW_JOB = [
    ("jobId", 1, STR, False),
    ("jobName", 2, STR, False),
    ("status", 3, STR, False),
    ("dependencies", 4, STR, True),
    ("startTime", 5, MSG, False),
    ("endTime", 6, MSG, False),
    ("exitCode", 7, I32, False),
]
ONE_ID_REQUESTS = [
    "GetJobStatusReq",
    "StopJobReq",
    "GetJobLogsReq",
    "CancelJobReq",
    "DeleteJobReq",
    "JobMetricsRequest",
]

# (method, request, response, server streaming) as in 001's service listing.
SPEC_METHODS = [
    ("RunJob", "RunJobReq", "RunJobRes", False),
    ("GetJobStatus", "GetJobStatusReq", "GetJobStatusRes", False),
    ("StopJob", "StopJobReq", "StopJobRes", False),
    ("CancelJob", "CancelJobReq", "CancelJobRes", False),
    ("DeleteJob", "DeleteJobReq", "DeleteJobRes", False),
    ("DeleteAllJobs", "DeleteAllJobsReq", "DeleteAllJobsRes", False),
    ("GetJobLogs", "GetJobLogsReq", "DataChunk", True),
    ("ListJobs", "EmptyRequest", "Jobs", False),
    ("GetJobMetrics", "JobMetricsRequest", "JobMetricsSample", True),
    ("RunWorkflow", "RunWorkflowRequest", "RunWorkflowResponse", False),
    ("GetWorkflowStatus", "GetWorkflowStatusRequest", "GetWorkflowStatusResponse", False),
    ("ListWorkflows", "ListWorkflowsRequest", "ListWorkflowsResponse", False),
    ("GetWorkflowJobs", "GetWorkflowJobsRequest", "GetWorkflowJobsResponse", False),
]


def _fields(message: str) -> dict[str, _d.FieldDescriptor]:
    return dict(pb.DESCRIPTOR.message_types_by_name[message].fields_by_name)


def _check(message: str, expected: list[tuple[str, int, object, bool]]) -> None:
    fields = _fields(message)
    for name, number, type_, repeated in expected:
        assert name in fields, f"{message}.{name} is missing"
        f = fields[name]
        assert f.number == number, f"{message}.{name} is {f.number}, spec says {number}"
        if type_ == MAP:
            assert f.message_type is not None and f.message_type.GetOptions().map_entry
        else:
            assert f.type == type_, f"{message}.{name} has the wrong type"
        assert f.is_repeated == repeated, f"{message}.{name} repeated-ness differs"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Job", SPEC_JOB),
        ("RunJobReq", SPEC_RUN_JOB_REQ),
        ("GetJobStatusRes", SPEC_STATUS_RES),
        ("StopJobRes", SPEC_STOP_RES),
        ("WorkflowJob", SPEC_WORKFLOW_JOB),
        ("DataChunk", [("payload", 1, BYTES, False)]),
        ("Jobs", [("jobs", 1, MSG, True)]),
        ("GetWorkflowStatusResponse", [("workflow", 1, MSG, False), ("jobs", 2, MSG, True)]),
    ],
)
def test_spec_field_numbers(message: str, expected: list[tuple[str, int, object, bool]]) -> None:
    _check(message, expected)


@pytest.mark.parametrize("message", ONE_ID_REQUESTS)
def test_one_job_requests_carry_id_1(message: str) -> None:
    fields = _fields(message)
    assert fields["id"].number == 1 and fields["id"].type == STR
    extra = {n: f.number for n, f in fields.items() if n != "id"}
    assert extra == ({"offset": 2} if message == "GetJobLogsReq" else {})


def test_empty_requests_have_no_fields() -> None:
    assert _fields("EmptyRequest") == {}
    assert _fields("DeleteAllJobsReq") == {}


def test_run_job_res_mirrors_job() -> None:
    job = {n: (f.number, f.type, f.is_repeated) for n, f in _fields("Job").items()}
    res = {n: (f.number, f.type, f.is_repeated) for n, f in _fields("RunJobRes").items()}
    assert job == res


def test_new_fields_do_not_reuse_numbers() -> None:
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        numbers = [f.number for f in message.fields]
        assert len(numbers) == len(set(numbers)), message.name


def test_service_matches_spec() -> None:
    service = pb.DESCRIPTOR.services_by_name["JobService"]
    assert service.full_name == "joblet.JobService"
    got = [
        (m.name, m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods
    ]
    assert got == SPEC_METHODS
    assert not any(m.client_streaming for m in service.methods)


def test_both_stub_flavours_cover_every_method() -> None:
    names = {m[0] for m in SPEC_METHODS}
    purerpc_service = joblet_grpc.JobServiceServicer().service
    assert purerpc_service.name == "joblet.JobService"
    assert set(purerpc_service.methods) == names
    assert all(hasattr(joblet_pb2_grpc.JobServiceStub, "__init__") for _ in names)
    assert {n for n in dir(joblet_pb2_grpc.JobServiceServicer) if not n.startswith("_")} == names


# The Persist Service (spec 000, "Persist Service API"): the spec's messages, in their own file.
SPEC_PERSIST_MESSAGES = [
    (
        "QueryLogsRequest",
        [
            ("job_id", 1, STR, False),
            ("stream", 2, STR, False),
            ("start_time", 3, I64, False),
            ("end_time", 4, I64, False),
            ("limit", 5, I32, False),
        ],
    ),
    ("QueryLogsResponse", [("entries", 1, MSG, True)]),
    (
        "LogEntry",
        [("timestamp", 1, I64, False), ("stream", 2, STR, False), ("content", 3, STR, False)],
    ),
    (
        "QueryMetricsRequest",
        [
            ("job_id", 1, STR, False),
            ("metric_type", 2, STR, False),
            ("start_time", 3, I64, False),
            ("end_time", 4, I64, False),
            ("limit", 5, I32, False),
        ],
    ),
    ("QueryMetricsResponse", [("samples", 1, MSG, True)]),
    (
        "MetricSample",
        [("timestamp", 1, I64, False), ("metric_type", 2, STR, False), ("values", 3, MAP, True)],
    ),
]


@pytest.mark.parametrize(("message", "expected"), SPEC_PERSIST_MESSAGES)
def test_persist_messages_keep_the_spec_numbers(
    message: str, expected: list[tuple[str, int, object, bool]]
) -> None:
    fields = dict(persist_pb.DESCRIPTOR.message_types_by_name[message].fields_by_name)
    assert set(fields) == {name for name, *_ in expected}, "no field beyond the spec's"
    for name, number, type_, repeated in expected:
        f = fields[name]
        assert f.number == number
        if type_ == MAP:
            assert f.message_type is not None and f.message_type.GetOptions().map_entry
            value = f.message_type.fields_by_name["value"]
            assert value.type == _d.FieldDescriptor.TYPE_DOUBLE
        else:
            assert f.type == type_
        assert f.is_repeated == repeated


def test_persist_service_is_its_own_file_and_package() -> None:
    assert persist_pb.DESCRIPTOR.name == "persist.proto"
    service = persist_pb.DESCRIPTOR.services_by_name["PersistService"]
    assert service.full_name == "joblet.persist.PersistService"
    got = [(m.name, m.input_type.name, m.output_type.name) for m in service.methods]
    assert got == [
        ("QueryLogs", "QueryLogsRequest", "QueryLogsResponse"),
        ("QueryMetrics", "QueryMetricsRequest", "QueryMetricsResponse"),
    ]
    # Streamed in batches of entries; nothing streams from the client.
    assert all(m.server_streaming and not m.client_streaming for m in service.methods)
    # joblet.proto keeps only JobService and none of the persist messages.
    assert list(pb.DESCRIPTOR.services_by_name) == ["JobService"]
    assert not {m for m, _ in SPEC_PERSIST_MESSAGES} & set(pb.DESCRIPTOR.message_types_by_name)
    purerpc_service = persist_grpc.PersistServiceServicer().service
    assert purerpc_service.name == "joblet.persist.PersistService"
    assert set(purerpc_service.methods) == {"QueryLogs", "QueryMetrics"}


def test_wire_bytes_built_from_spec_numbers_decode() -> None:
    """A peer that knows only the spec's numbers interoperates: build the bytes by hand."""

    def string_field(number: int, value: bytes) -> bytes:
        return bytes([number << 3 | 2, len(value)]) + value

    def varint_field(number: int, value: int) -> bytes:
        return bytes([number << 3, value])

    raw = string_field(1, b"abc") + string_field(3, b"echo") + varint_field(12, 7)
    raw += bytes([20 << 3 | 2, 0x01, 2]) + b"n1"  # field 20 needs a two-byte tag
    job = pb.Job.FromString(raw)
    assert (job.id, job.command, job.exitCode, job.nodeId) == ("abc", "echo", 7, "n1")
    status = pb.GetJobStatusRes.FromString(bytes([26 << 3 | 2, 0x01, 2]) + b"n2")
    assert status.nodeId == "n2"
    assert pb.DataChunk.FromString(b"\x0a\x03\xff\x00\x01").payload == b"\xff\x00\x01"
    req = pb.RunJobReq.FromString(string_field(1, b"ls") + varint_field(3, 50))
    assert (req.command, req.maxCPU) == ("ls", 50)


def test_invalid_utf8_in_a_string_field_is_rejected_by_protobuf() -> None:
    with pytest.raises(DecodeError):
        pb.RunJobReq.FromString(b"\x0a\x02\xff\xfe")


def test_round_trip_every_message_kind() -> None:
    job = pb.Job(
        id="f47ac10b-58cc-4372-a567-0e02b2c3d479",
        command="python3",
        args=["script.py", ""],
        maxCPU=50,
        maxIOBPS=2**31 - 1,
        environment={"A": "1"},
        nodeId="node-1",
        reason="OOMKilled",
    )
    assert pb.Job.FromString(job.SerializeToString()) == job
    jobs = pb.Jobs(jobs=[job, job])
    assert pb.Jobs.FromString(jobs.SerializeToString()) == jobs
    status = pb.GetJobStatusRes(
        uuid="u", maxIOBPS=2**40, uploads=[pb.FileUpload(path="a", content=b"\x00")], nodeId="x"
    )
    assert pb.GetJobStatusRes.FromString(status.SerializeToString()) == status
    wf = pb.GetWorkflowStatusResponse(
        workflow=pb.WorkflowInfo(uuid="w", createdAt=pb.Timestamp(seconds=5, nanos=1)),
        jobs=[pb.WorkflowJob(jobId="0", jobName="setup", dependencies=["a"])],
    )
    assert pb.GetWorkflowStatusResponse.FromString(wf.SerializeToString()) == wf
    sample = pb.JobMetricsSample(jobId="j", cpu=pb.JobCpuMetrics(usagePercent=12.5))
    assert pb.JobMetricsSample.FromString(sample.SerializeToString()) == sample


def test_timestamp_is_wire_compatible_with_google_timestamp() -> None:
    from google.protobuf import timestamp_pb2

    ours = pb.Timestamp(seconds=1705314600, nanos=42)
    theirs = timestamp_pb2.Timestamp.FromString(ours.SerializeToString())
    assert (theirs.seconds, theirs.nanos) == (1705314600, 42)


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """The committed code is what `just proto` produces from proto/*.proto."""
    written = gen.generate(out_dir=tmp_path)
    assert {p.name for p in written} == {
        "__init__.py",
        *(
            f"{name}{suffix}"
            for name in ("joblet", "persist")
            for suffix in ("_pb2.py", "_pb2.pyi", "_grpc.py", "_grpc.pyi", "_pb2_grpc.py")
        ),
    }
    for fresh in written:
        committed = gen.OUT_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale: run just proto"


def test_fix_imports_only_touches_sibling_modules() -> None:
    source = (
        "import purerpc\nimport joblet_pb2 as joblet__pb2\n"
        "import google.protobuf.timestamp_pb2 as ts\nfrom joblet_pb2 import Job\n"
    )
    fixed = gen.fix_imports(source, {"joblet_pb2"})
    assert fixed == (
        "import purerpc\nfrom . import joblet_pb2 as joblet__pb2\n"
        "import google.protobuf.timestamp_pb2 as ts\nfrom .joblet_pb2 import Job\n"
    )


# --- convert --------------------------------------------------------------------------------------


def _info(**kw: object) -> JobInfo:
    spec = JobSpec(
        command="python3",
        args=("script.py",),
        limits=Limits(cpu_percent=50, memory_mb=512, io_bps=0, cpu_cores="0-1"),
        env={"A": "1"},
        network="none",
        name="setup",
    )
    base: dict[str, object] = dict(
        id="f47ac10b-58cc-4372-a567-0e02b2c3d479",
        spec=spec,
        status=JobStatus.COMPLETED,
        start_time=1705314600.75,
        end_time=1705315500.0,
        exit_code=137,
        reason="OOMKilled",
        node_id="node-1",
    )
    base.update(kw)
    return JobInfo(**base)  # type: ignore[arg-type]


def test_job_to_pb() -> None:
    msg = convert.job_to_pb(_info())
    assert msg.id == "f47ac10b-58cc-4372-a567-0e02b2c3d479"
    assert (msg.command, list(msg.args), msg.name) == ("python3", ["script.py"], "setup")
    assert (msg.maxCPU, msg.maxMemory, msg.maxIOBPS, msg.cpuCores) == (50, 512, 0, "0-1")
    assert msg.status == "COMPLETED"
    assert (msg.startTime, msg.endTime) == ("2024-01-15T10:30:00Z", "2024-01-15T10:45:00Z")
    assert (msg.exitCode, msg.reason, msg.nodeId, msg.network) == (
        137,
        "OOMKilled",
        "node-1",
        "none",
    )
    assert dict(msg.environment) == {"A": "1"}


def test_run_job_res_equals_job_on_the_wire() -> None:
    info = _info(status=JobStatus.RUNNING, end_time=None, exit_code=0, reason="")
    res = convert.run_job_res(info)
    assert res.endTime == ""
    assert res.SerializeToString() == convert.job_to_pb(info).SerializeToString()


def test_job_status_res() -> None:
    msg = convert.job_status_res(_info(spec=JobSpec(command="x", limits=Limits(io_bps=2**40))))
    assert msg.uuid.startswith("f47ac10b")
    assert msg.maxIOBPS == 2**40  # int64 here, unclamped
    assert (msg.nodeId, msg.reason, msg.network) == ("node-1", "OOMKilled", "host")
    assert (
        convert.job_to_pb(_info(spec=JobSpec(command="x", limits=Limits(io_bps=2**40)))).maxIOBPS
        == 2**31 - 1
    )


def test_stop_job_res() -> None:
    msg = convert.stop_job_res(_info(status=JobStatus.STOPPED, exit_code=-1))
    assert (msg.status, msg.exitCode, msg.endTime) == ("STOPPED", -1, "2024-01-15T10:45:00Z")


def test_jobs_to_pb() -> None:
    assert len(convert.jobs_to_pb([_info(), _info(id="b")]).jobs) == 2


def test_clamping_and_times() -> None:
    assert convert.clamp_int32(2**40) == 2**31 - 1
    assert convert.clamp_int32(-(2**40)) == -(2**31)
    assert convert.clamp_int64(2**70) == 2**63 - 1
    assert convert.rfc3339(None) == ""
    assert convert.rfc3339(math.nan) == ""
    assert convert.rfc3339(1e20) == ""
    assert convert.rfc3339(0) == "1970-01-01T00:00:00Z"
    assert convert.parse_rfc3339("2024-01-15T10:30:00Z") == 1705314600
    assert convert.parse_rfc3339("") is None
    with pytest.raises(ValueError):
        convert.parse_rfc3339("2024-01-15T10:30:00")
    big = _info(exit_code=2**40, spec=JobSpec(command="x", limits=Limits(memory_mb=2**33)))
    msg = convert.job_to_pb(big)
    assert (msg.exitCode, msg.maxMemory) == (2**31 - 1, 2**31 - 1)


def test_spec_fields_from_run_req_passes_raw_values() -> None:
    req = pb.RunJobReq(
        command="  ",
        args=["a", ""],
        maxCPU=-5,
        maxMemory=0,
        maxIOBPS=7,
        cpuCores="bogus",
        environment={"1BAD": "x"},
        network="weird",
        name="n",
    )
    assert convert.run_request(req) == RunRequest(
        command="  ",
        args=("a", ""),
        max_cpu=-5,
        max_memory=0,
        max_iobps=7,
        cpu_cores="bogus",
        env={"1BAD": "x"},
        network="weird",
        name="n",
    )


def test_run_requests_feed_build_spec() -> None:
    from joblet.core.validate import HostFacts, build_spec

    request = convert.run_request(pb.RunJobReq(command="echo", args=["hi"]))
    spec = build_spec(request, defaults=Limits(), host=HostFacts(1024, frozenset({0})))
    assert (spec.command, spec.args, spec.network) == ("echo", ("hi",), "host")


# --- real calls: purerpc server, purerpc and grpcio clients ---------------------------------------


class _Servicer(joblet_grpc.JobServiceServicer):
    async def RunJob(self, input_message: pb.RunJobReq) -> pb.RunJobRes:
        return pb.RunJobRes(id="job-1", command=input_message.command, nodeId="n")

    async def GetJobLogs(self, input_message: pb.GetJobLogsReq) -> AsyncIterator[pb.DataChunk]:
        for i in range(input_message.offset, 3):
            yield pb.DataChunk(payload=bytes([i]) * 40000)


class _Channel(purerpc.client._Channel):  # type: ignore[misc]
    """purerpc's channel, but closing its socket on exit (purerpc's own leaves it open)."""

    async def __aenter__(self) -> _Channel:
        await AsyncExitStack.__aenter__(self)
        stream = await anyio.connect_tcp(self._host, self._port)
        self.push_async_callback(stream.aclose)
        socket = GRPCProtoSocket(GRPCConfiguration(client_side=True), stream)
        self._grpc_socket = await self.enter_async_context(socket)
        return self


async def _serve(listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
    """Serve ``_Servicer`` on ``listener``, closing each connection when it ends.

    ``purerpc.Server.serve_async`` leaks its listening socket and open connections when cancelled,
    so the listener is ours and purerpc only handles connections.
    """
    service = _Servicer().service
    handler = ConnectionHandler({service.name: service}, purerpc.Server(port=0))

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await handler(stream)

    await listener.serve(handle)


@pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning")
async def test_purerpc_server_answers_purerpc_and_grpcio_clients() -> None:
    with trio.fail_after(20):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener, trio.open_nursery() as nursery:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            nursery.start_soon(_serve, listener)

            async with _Channel("127.0.0.1", port) as channel:
                stub = joblet_grpc.JobServiceStub(channel)
                res = await stub.RunJob(pb.RunJobReq(command="echo"))
                assert (res.id, res.command, res.nodeId) == ("job-1", "echo", "n")
                chunks = [c.payload async for c in stub.GetJobLogs(pb.GetJobLogsReq(id="x"))]
                assert chunks == [bytes([i]) * 40000 for i in range(3)]

            def grpcio_calls() -> tuple[pb.RunJobRes, list[bytes]]:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    gstub = joblet_pb2_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]
                    r = gstub.RunJob(pb.RunJobReq(command="ls"), timeout=10)
                    logs = gstub.GetJobLogs(pb.GetJobLogsReq(id="x", offset=1), timeout=10)
                    return r, [c.payload for c in logs]

            res2, chunks2 = await trio.to_thread.run_sync(grpcio_calls)
            assert (res2.id, res2.command) == ("job-1", "ls")
            assert chunks2 == [bytes([i]) * 40000 for i in (1, 2)]
            nursery.cancel_scope.cancel()
    # purerpc never closes the memory channels of its HTTP/2 streams; collect them while this
    # test's warning filter applies.
    gc.collect()
