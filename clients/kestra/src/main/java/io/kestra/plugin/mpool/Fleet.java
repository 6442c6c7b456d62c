package io.kestra.plugin.mpool;

import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.kestra.core.runners.RunContext;
import mpool.v1.PoolOuterClass.AcquireRequest;
import mpool.v1.PoolOuterClass.GetPoolRequest;
import mpool.v1.PoolOuterClass.Lease;
import mpool.v1.PoolOuterClass.PoolInfo;

import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;

/**
 * Several mpool hosts as one: each host runs its own {@code mpool serve}; the task chooses among
 * their endpoints. It asks every host about the pool (GetPool, answers kept {@link #VIEW_TTL} per
 * worker, asked again after a failed try), orders them with {@link HostChoice}, and tries them in
 * that order: a host that is down
 * or draining (UNAVAILABLE), that has no VM within the wait (RESOURCE_EXHAUSTED) or no such pool
 * (NOT_FOUND) is left for the next. Other failures (a refused token, a bad argument) would be the
 * same everywhere and fail at once.
 *
 * <p>An attempt with a request id records, in Kestra's state store, the host it asks before asking
 * it. A re-submitted attempt (the same request id: a worker that restarted) goes back to that host
 * only, for the same lease; if the host does not answer, it waits for it up to the attempt's wait
 * and fails UNAVAILABLE, so the same attempt never runs on two hosts. Kestra's retry is a new
 * attempt with a new request id, which any host may take.
 */
public final class Fleet {
    /** How long what the hosts said about a pool is used before asking again. */
    static final Duration VIEW_TTL = Duration.ofMillis(1500);
    /** How long a host gets to answer GetPool. */
    static final long ASK_SECONDS = 3;
    /** How long a re-submitted attempt waits for its host when the request gives no wait. */
    static final Duration DEFAULT_STICKY_WAIT = Duration.ofSeconds(60);
    /** The state store entry that remembers which host a request id went to. */
    static final String STATE = "mpool-lease-host";

    private static final Map<String, View> VIEWS = new ConcurrentHashMap<>();

    private record View(Instant at, List<HostChoice.Seen> seen) {
    }

    private Fleet() {
    }

    /** A lease, the host that holds it and a client of that host (close it when done). */
    public record Leased(MpoolClient client, Lease lease, String endpoint) {
    }

    /** Leases a VM from one of {@code endpoints} for {@code request}. */
    public static Leased acquire(RunContext rc, List<String> endpoints, String token, String ca, AcquireRequest request) throws Exception {
        String rid = request.getRequestId();
        if (!rid.isEmpty()) {
            String held = recorded(rc, rid);
            if (held != null) {
                rc.logger().info("Request id {} went to {} before: asking that host again", rid, held);
                return sticky(rc, held, token, ca, request);
            }
        }
        String key = String.join(",", endpoints) + "|" + request.getPool();
        int spread = ThreadLocalRandom.current().nextInt(1 << 16);
        Instant started = Instant.now();
        boolean waitSpent = false;
        // Hosts already asked without waiting, waited on, or found unreachable.
        Set<Integer> asked = new HashSet<>();
        Set<Integer> waited = new HashSet<>();
        Set<Integer> gone = new HashSet<>();
        List<String> misses = new ArrayList<>();
        Status.Code last = Status.Code.UNAVAILABLE;
        while (true) {
            // A fresh view after each failed try, so a host that just ran out is not waited on
            // while another has a VM.
            List<HostChoice.Seen> seen = seen(key, endpoints, token, ca, request.getPool());
            HostChoice.Attempt a = HostChoice.plan(seen, spread).stream()
                .filter(x -> !gone.contains(x.host()) && !(x.waits() ? waited : asked).contains(x.host()))
                .findFirst()
                .orElse(null);
            if (a == null) {
                break;
            }
            (a.waits() ? waited : asked).add(a.host());
            String endpoint = endpoints.get(a.host());
            AcquireRequest.Builder b = request.toBuilder();
            if (!a.waits() || waitSpent) {
                b.setWait(Run.proto(Duration.ZERO));
            } else if (request.hasWait()) {
                b.setWait(Run.proto(left(request.getWait(), started)));
            }
            if (!rid.isEmpty()) {
                record(rc, rid, endpoint);
            }
            MpoolClient client = MpoolClient.connect(endpoint, token, ca);
            try {
                Lease lease = client.acquire(b.build());
                return new Leased(client, lease, endpoint);
            } catch (StatusRuntimeException e) {
                client.close();
                VIEWS.remove(key);
                Status.Code code = e.getStatus().getCode();
                if (code != Status.Code.UNAVAILABLE && code != Status.Code.RESOURCE_EXHAUSTED && code != Status.Code.NOT_FOUND) {
                    throw e;
                }
                if (a.waits() && code == Status.Code.RESOURCE_EXHAUSTED) {
                    waitSpent = true;
                } else if (code != Status.Code.RESOURCE_EXHAUSTED) {
                    gone.add(a.host());
                }
                rc.logger().info("{} did not lease a VM from pool {} ({}: {}); trying the next host", endpoint, request.getPool(), code, e.getStatus().getDescription());
                misses.add(endpoint + ": " + code + ": " + e.getStatus().getDescription());
                last = code;
            } catch (RuntimeException e) {
                client.close();
                throw e;
            }
        }
        String why = misses.isEmpty()
            ? "each host is draining or has no such pool"
            : String.join("; ", misses);
        throw Status.fromCode(last).withDescription("no host leased a VM from pool " + request.getPool() + ": " + why).asRuntimeException();
    }

    /** A re-submitted attempt: the host its request id went to, and no other. */
    private static Leased sticky(RunContext rc, String endpoint, String token, String ca, AcquireRequest request) throws Exception {
        Duration wait = request.hasWait()
            ? Duration.ofSeconds(request.getWait().getSeconds(), request.getWait().getNanos())
            : DEFAULT_STICKY_WAIT;
        Instant deadline = Instant.now().plus(wait);
        while (true) {
            MpoolClient client = MpoolClient.connect(endpoint, token, ca);
            try {
                Duration remaining = Duration.between(Instant.now(), deadline);
                Lease lease = client.acquire(request.toBuilder().setWait(Run.proto(remaining.isNegative() ? Duration.ZERO : remaining)).build());
                return new Leased(client, lease, endpoint);
            } catch (StatusRuntimeException e) {
                client.close();
                if (e.getStatus().getCode() != Status.Code.UNAVAILABLE || !Instant.now().plusSeconds(1).isBefore(deadline)) {
                    if (e.getStatus().getCode() == Status.Code.UNAVAILABLE) {
                        throw Status.UNAVAILABLE.withDescription("host " + endpoint + " holds (or may hold) the lease of request id "
                            + request.getRequestId() + " and did not answer within " + wait.toSeconds() + "s; this attempt "
                            + "does not move to another host so that it never runs twice (a retry, a new attempt, may run anywhere): "
                            + e.getStatus().getDescription()).asRuntimeException();
                    }
                    throw e;
                }
            } catch (RuntimeException e) {
                client.close();
                throw e;
            }
            TimeUnit.SECONDS.sleep(1);
        }
    }

    /** What is left of {@code wait} counted from {@code since}, never negative. */
    private static Duration left(com.google.protobuf.Duration wait, Instant since) {
        Duration total = Duration.ofSeconds(wait.getSeconds(), wait.getNanos());
        Duration left = total.minus(Duration.between(since, Instant.now()));
        return left.isNegative() ? Duration.ZERO : left;
    }

    /** What every host says about {@code pool}, kept {@link #VIEW_TTL}. */
    private static List<HostChoice.Seen> seen(String key, List<String> endpoints, String token, String ca, String pool) throws Exception {
        View v = VIEWS.get(key);
        if (v != null && Duration.between(v.at(), Instant.now()).compareTo(VIEW_TTL) < 0) {
            return v.seen();
        }
        List<HostChoice.Seen> seen = new ArrayList<>();
        for (String endpoint : endpoints) {
            try (MpoolClient client = MpoolClient.connect(endpoint, token, ca)) {
                PoolInfo p = client.stub().withDeadlineAfter(ASK_SECONDS, TimeUnit.SECONDS)
                    .getPool(GetPoolRequest.newBuilder().setPool(pool).build());
                seen.add(HostChoice.Seen.pool(p.getReady(), p.getComing(), p.getWaiters(), p.getDraining()));
            } catch (StatusRuntimeException e) {
                Status.Code c = e.getStatus().getCode();
                seen.add(c == Status.Code.NOT_FOUND || c == Status.Code.PERMISSION_DENIED ? HostChoice.Seen.noPool() : HostChoice.Seen.silent());
            }
        }
        VIEWS.put(key, new View(Instant.now(), seen));
        return seen;
    }

    /** The host request id {@code rid} went to before, if any. */
    private static String recorded(RunContext rc, String rid) {
        try (InputStream in = rc.stateStore().getState(STATE, rid, null)) {
            String endpoint = new String(in.readAllBytes(), StandardCharsets.UTF_8).trim();
            return endpoint.isEmpty() ? null : endpoint;
        } catch (Exception e) {
            return null;
        }
    }

    /**
     * Remembers that {@code rid} goes to {@code endpoint}, before asking it. If Kestra's state
     * store cannot take it, the attempt fails: without the record a re-submitted attempt could run
     * on another host too.
     */
    private static void record(RunContext rc, String rid, String endpoint) throws Exception {
        try {
            rc.stateStore().putState(STATE, rid, null, endpoint.getBytes(StandardCharsets.UTF_8));
        } catch (Exception e) {
            throw new IllegalStateException("recording which host request id " + rid + " goes to, in Kestra's state store: " + e, e);
        }
    }
}
