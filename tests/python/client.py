"""A Python client of mpool.v1.Pool, on stubs generated from proto/ with grpcio-tools.

Run by tests/python_client.rs as: python3 client.py SOCKET_PATH POOL TLS_ADDR CA_FILE TOKEN, with
PYTHONPATH set to the directory the stubs were generated into. Prints one `ok ...` line per check
and exits 0; any failed check raises (exit 1) with what was expected and what came back.

On the Unix socket the channel sets `grpc.default_authority` to "localhost": grpc's C core
(grpcio >= 1.57) sends the percent-encoded socket path as `:authority`, which the server's HTTP/2
layer (hyperium/h2, under tonic) refuses as malformed with RST_STREAM PROTOCOL_ERROR
(grpc/grpc#38142, hyperium/h2#487). Over TCP nothing special is needed.
"""

import hashlib
import random
import sys

import grpc
from google.protobuf import duration_pb2

from mpool.v1 import pool_pb2 as pb
from mpool.v1 import pool_pb2_grpc as pb_grpc


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def expect_error(code, call, *args):
    """Runs a call that must fail with `code`; returns the status details."""
    try:
        result = call(*args)
        # Server-streaming calls fail when the stream is read.
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    except grpc.RpcError as e:
        check(e.code() == code, f"expected {code}, got {e.code()}: {e.details()}")
        return e.details()
    raise AssertionError(f"expected {code}, the call succeeded")


def exec_argv(stub, lease_id, argv, **kw):
    """Runs argv on a lease; returns (exit code, stdout, stderr, events)."""
    req = pb.ExecRequest(lease_id=lease_id, command=pb.Command(argv=argv, **kw))
    out, err, code, events = [], [], None, []
    for ev in stub.Exec(req):
        kind = ev.WhichOneof("event")
        events.append(kind)
        if kind == "stdout":
            out.append(ev.stdout)
        elif kind == "stderr":
            err.append(ev.stderr)
        elif kind == "exit":
            code = ev.exit.code
    return code, "".join(out), "".join(err), events


def upload_chunks(lease_id, path, data, mode, chunk):
    """The Upload stream: lease, path and mode in the first message, data in many."""
    yield pb.UploadRequest(lease_id=lease_id, path=path, mode=mode, data=data[:chunk])
    for i in range(chunk, len(data), chunk):
        yield pb.UploadRequest(data=data[i : i + chunk])


# The README's "More than one host" snippet, as it is there.
def pick_host(stubs, pool):
    """The stub of the host to lease from: the most ready VMs, else the best outlook."""
    best = None
    for stub in random.sample(stubs, len(stubs)):  # shuffled: ties spread
        try:
            p = stub.GetPool(pb.GetPoolRequest(pool=pool), timeout=3)
        except grpc.RpcError:
            continue  # down: the others may answer
        if p.draining:
            continue
        rank = (p.ready, p.ready + p.coming - p.waiters)
        if best is None or rank > best[0]:
            best = (rank, stub)
    return best and best[1]


def unix_channel(path):
    """A channel to mpool's Unix socket (see the module doc for the authority)."""
    return grpc.insecure_channel("unix:" + path, options=[("grpc.default_authority", "localhost")])


def tls_channel(addr, ca_file, token):
    """A channel to mpool's TCP listener: TLS verified against the CA, the token on every call."""
    with open(ca_file, "rb") as f:
        tls = grpc.ssl_channel_credentials(root_certificates=f.read())
    creds = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(addr, creds)


def main():
    socket_path, pool, tls_addr, ca_file, token = sys.argv[1:6]

    # Without the authority option the C core's default is refused (reported, not required).
    try:
        pb_grpc.PoolStub(grpc.insecure_channel("unix:" + socket_path)).ListPools(pb.ListPoolsRequest(), timeout=10)
        print("info default-authority unix channel: accepted")
    except grpc.RpcError as e:
        print(f"info default-authority unix channel: refused ({e.code().name}: {e.details()})")

    channel = unix_channel(socket_path)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = pb_grpc.PoolStub(channel)

    # Run: the description, then input content in chunks (any number, any size); the answer is
    # the lease, the output, the output files in chunks, then the result.
    run = pb.RunRequest(
        pool=pool,
        holder="python",
        command=pb.Command(script="cat in.txt; echo to-stderr >&2; printf 'out\\n' > out.txt; exit 5"),
        inputs=[pb.InputFile(path="in.txt", data=b"from ", mode=0o600)],
        outputs=["out.txt", "absent.txt"],
    )
    chunks = [pb.RunRequest(chunk=pb.InputChunk(input=0, data=part)) for part in (b"pyth", b"on\n")]
    events = list(stub.Run(iter([run] + chunks)))
    kinds = [e.WhichOneof("event") for e in events]
    check(kinds[0] == "lease" and kinds[-1] == "result", f"Run events: {kinds}")
    check(events[0].lease.holder == "python" and events[0].lease.id.startswith("lease-"), f"lease: {events[0].lease}")
    stdout = "".join(e.stdout for e in events if e.WhichOneof("event") == "stdout")
    stderr = "".join(e.stderr for e in events if e.WhichOneof("event") == "stderr")
    check(stdout == "from python\n", f"Run stdout: {stdout!r}")
    check(stderr == "to-stderr\n", f"Run stderr: {stderr!r}")
    result = events[-1].result
    check(result.exit.code == 5, f"Run exit: {result.exit}")
    out, absent = result.outputs
    data = b"".join(e.output.data for e in events if e.WhichOneof("event") == "output" and e.output.output == 0)
    check(out.path == "out.txt" and data == b"out\n" and out.size == 4 and not out.missing and not out.error, f"out.txt: {out} {data!r}")
    check(absent.path == "absent.txt" and absent.missing, f"absent.txt: {absent}")
    check(result.served in (pb.SERVED_HOT, pb.SERVED_WARM, pb.SERVED_COLD), f"served: {result.served}")
    check(result.timings.total.ToTimedelta().total_seconds() >= 0, "timings")
    print(f"ok run exit={result.exit.code} stdout={stdout!r} vm={result.vm}")

    # A lease cycle: Acquire, Exec, Upload, Download, Renew, Release.
    lease = stub.Acquire(
        pb.AcquireRequest(pool=pool, holder="python", request_id="py-1", ttl=duration_pb2.Duration(seconds=600))
    )
    check(lease.id.startswith("lease-") and lease.pool == pool, f"lease: {lease}")
    check(lease.expires_at.seconds - lease.granted_at.seconds == 600, f"ttl: {lease.granted_at} {lease.expires_at}")
    again = stub.Acquire(pb.AcquireRequest(pool=pool, request_id="py-1"))
    check(again.id == lease.id and again.served == pb.SERVED_REPEAT, f"repeat: {again}")
    print(f"ok acquire {lease.id} on {lease.vm} served={pb.Served.Name(lease.served)}")

    code, out, err, kinds = exec_argv(stub, lease.id, ["sh", "-c", "echo \"$A $1\"; echo e >&2; exit 7", "sh", "arg with space"], env={"A": "env-a"})
    check(kinds[0] == "started" and kinds[-1] == "exit", f"Exec events: {kinds}")
    check((code, out, err) == (7, "env-a arg with space\n", "e\n"), f"Exec: {(code, out, err)}")
    print(f"ok exec exit={code} stdout={out!r}")

    # 3 MiB of every byte value, in 1 MiB messages, mode 0750.
    data = bytes(range(256)) * (3 * 4096)
    up = stub.Upload(upload_chunks(lease.id, "dir/blob.bin", data, 0o750, 1 << 20))
    check(up.size == len(data) and up.path == "dir/blob.bin", f"Upload: {up}")
    chunks = list(stub.Download(pb.DownloadRequest(lease_id=lease.id, path="dir/blob.bin")))
    got = b"".join(c.data for c in chunks)
    check(chunks[0].size == len(data) and chunks[0].mode == 0o750, f"Download header: size={chunks[0].size} mode={oct(chunks[0].mode)}")
    offsets = [c.offset for c in chunks]
    check(offsets == sorted(offsets) and offsets[0] == 0, f"offsets: {offsets}")
    check(hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), f"Download content: {len(got)} bytes")
    code, out, _, _ = exec_argv(stub, lease.id, ["sha256sum", "dir/blob.bin"])
    check(code == 0 and out.split()[0] == hashlib.sha256(data).hexdigest(), f"sha256 in the VM: {out!r}")
    print(f"ok upload+download {len(data)} bytes in {len(chunks)} chunks mode={oct(chunks[0].mode)}")

    renewed = stub.Renew(pb.RenewRequest(lease_id=lease.id, ttl=duration_pb2.Duration(seconds=1200)))
    check(renewed.expires_at.seconds > lease.expires_at.seconds, f"Renew: {renewed.expires_at}")
    listed = stub.ListLeases(pb.ListLeasesRequest(pool=pool))
    check(any(l.id == lease.id for l in listed.leases), f"ListLeases: {listed}")

    stub.Release(pb.ReleaseRequest(lease_id=lease.id))
    stub.Release(pb.ReleaseRequest(lease_id=lease.id))  # idempotent
    details = expect_error(grpc.StatusCode.FAILED_PRECONDITION, exec_argv, stub, lease.id, ["true"])
    check("acquire a new one" in details, f"message: {details}")
    print("ok release (twice), then exec refused: FAILED_PRECONDITION")

    details = expect_error(grpc.StatusCode.NOT_FOUND, stub.Acquire, pb.AcquireRequest(pool="no-such-pool"))
    check("mpool status" in details, f"message: {details}")
    print("ok unknown pool: NOT_FOUND")

    pools = stub.ListPools(pb.ListPoolsRequest())
    check([p.name for p in pools.pools] == [pool], f"ListPools: {pools}")
    check(pools.pools[0].host != "" and not pools.pools[0].draining, f"host: {pools.pools[0]}")

    # Two hosts, one of them down: the choice goes to the one that answers; none answering, None.
    down = pb_grpc.PoolStub(unix_channel(socket_path + ".down"))
    for _ in range(4):
        check(pick_host([down, stub], pool) is stub, "pick_host chose the host that answers")
    check(pick_host([down], pool) is None, "pick_host with no host up")
    lease = pick_host([down, stub], pool).Acquire(pb.AcquireRequest(pool=pool, holder="python"))
    stub.Release(pb.ReleaseRequest(lease_id=lease.id))
    print(f"ok pick host: {pools.pools[0].host}")

    # Over TCP: TLS against the CA plus a bearer token; without the token, UNAUTHENTICATED.
    tls = pb_grpc.PoolStub(tls_channel(tls_addr, ca_file, token))
    events = list(tls.Run(iter([pb.RunRequest(pool=pool, command=pb.Command(argv=["echo", "over tls"]))])))
    check(events[-1].result.exit.code == 0, f"Run over TLS: {events[-1]}")
    check("".join(e.stdout for e in events) == "over tls\n", f"Run over TLS stdout: {events}")
    with open(ca_file, "rb") as f:
        anonymous = pb_grpc.PoolStub(grpc.secure_channel(tls_addr, grpc.ssl_channel_credentials(root_certificates=f.read())))
    details = expect_error(grpc.StatusCode.UNAUTHENTICATED, anonymous.ListPools, pb.ListPoolsRequest())
    check("authorization: Bearer" in details, f"message: {details}")
    print("ok tls with token; without: UNAUTHENTICATED")
    print("ok all")


if __name__ == "__main__":
    main()
