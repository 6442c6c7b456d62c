package io.kestra.plugin.mpool;

import io.kestra.core.models.property.Property;
import io.kestra.core.runners.RunContext;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import mpool.v1.PoolOuterClass.AcquireRequest;

/** Connection settings shared by the tasks and the task runner. */
public interface MpoolConnection {
    /** Where `mpool serve` listens by default. */
    String DEFAULT_ENDPOINT = "unix:/run/mpool/mpool.sock";

    Property<String> getEndpoint();

    Property<List<String>> getEndpoints();

    Property<String> getToken();

    Property<String> getCa();

    /** The endpoints to choose among, rendered (blanks dropped, each once); empty when only {@code endpoint} is set. */
    static List<String> endpoints(RunContext runContext, Property<List<String>> endpoints) throws Exception {
        List<String> out = new ArrayList<>();
        if (endpoints == null) {
            return out;
        }
        for (String e : runContext.render(endpoints).asList(String.class)) {
            String t = e == null ? "" : e.trim();
            if (!t.isEmpty() && !out.contains(t)) {
                out.add(t);
            }
        }
        return out;
    }

    /**
     * Leases a VM: from the host {@link Fleet} chooses among {@code endpoints} when they are set,
     * else from {@code endpoint}. The caller closes the returned client.
     */
    static Fleet.Leased acquire(RunContext runContext, MpoolConnection c, AcquireRequest request) throws Exception {
        String t = runContext.render(c.getToken()).as(String.class).orElse(null);
        String ca = runContext.render(c.getCa()).as(String.class).orElse(null);
        List<String> many = endpoints(runContext, c.getEndpoints());
        if (!many.isEmpty()) {
            return Fleet.acquire(runContext, many, t, ca, request);
        }
        String e = runContext.render(c.getEndpoint()).as(String.class).orElse(DEFAULT_ENDPOINT);
        MpoolClient client = MpoolClient.connect(e, t, ca);
        try {
            return new Fleet.Leased(client, client.acquire(request), e);
        } catch (RuntimeException ex) {
            client.close();
            throw ex;
        }
    }

    /** The lease of a task attempt, and the attempt it ended up being. */
    record AttemptLease(Fleet.Leased leased, Attempt attempt) {
    }

    /**
     * Leases the VM of a task attempt, with {@code fixedRequestId} or else the attempt's request id
     * (plus {@code suffix}). A resumed attempt whose earlier lease has ended (FAILED_PRECONDITION:
     * no command left to follow) starts afresh as a new attempt.
     */
    static AttemptLease acquire(RunContext runContext, MpoolConnection c, AcquireRequest request, Attempt attempt, String fixedRequestId, String suffix) throws Exception {
        AcquireRequest.Builder b = request.toBuilder();
        if (fixedRequestId != null) {
            b.setRequestId(fixedRequestId);
        } else if (attempt != null) {
            b.setRequestId(attempt.requestId(suffix));
        }
        try {
            return new AttemptLease(acquire(runContext, c, b.build()), attempt);
        } catch (io.grpc.StatusRuntimeException e) {
            if (fixedRequestId != null || attempt == null || !attempt.resumed() || e.getStatus().getCode() != io.grpc.Status.Code.FAILED_PRECONDITION) {
                throw e;
            }
            Attempt fresh = Attempt.fresh(runContext);
            runContext.logger().warn("The lease of attempt {} of task run {} has ended ({}): nothing left to follow, starting afresh as attempt {}",
                attempt.number(), attempt.taskRunId(), e.getStatus().getDescription(), fresh.number());
            return new AttemptLease(acquire(runContext, c, b.setRequestId(fresh.requestId(suffix)).build()), fresh);
        }
    }

    /** A client of the host that holds a lease, and the lease id that host knows. */
    record OnLease(MpoolClient client, String leaseId) {
    }

    /**
     * Connects to the host holding {@code lease}: the host a handle (Acquire's {@code leaseId} when it
     * chose among {@code endpoints}) names, else {@code endpoint}.
     */
    static OnLease onLease(RunContext runContext, MpoolConnection c, String lease) throws Exception {
        LeaseHandle h = LeaseHandle.decode(lease);
        String e = h.endpoint() != null ? h.endpoint() : runContext.render(c.getEndpoint()).as(String.class).orElse(DEFAULT_ENDPOINT);
        String t = runContext.render(c.getToken()).as(String.class).orElse(null);
        String ca = runContext.render(c.getCa()).as(String.class).orElse(null);
        return new OnLease(MpoolClient.connect(e, t, ca), h.leaseId());
    }

    /**
     * The idempotency key of this task attempt: the task run id and its attempt number (see
     * {@link Attempt}: a re-submitted attempt keeps the number of the attempt it takes over), so
     * a worker restart gets its lease back instead of a second VM.
     */
    static String requestId(RunContext runContext, String suffix) {
        Attempt a = Attempt.of(runContext);
        return a == null ? null : a.requestId(suffix);
    }

    /** Who holds the lease, shown by `mpool leases`: namespace.flow/execution/task. */
    @SuppressWarnings("unchecked")
    static String holder(RunContext runContext) {
        Map<String, Object> vars = runContext.getVariables();
        Object flow = vars.get("flow");
        Object execution = vars.get("execution");
        Object task = vars.get("task");
        StringBuilder b = new StringBuilder("kestra");
        if (flow instanceof Map<?, ?> f) {
            b.append(':').append(f.get("namespace")).append('.').append(f.get("id"));
        }
        if (execution instanceof Map<?, ?> e) {
            b.append('/').append(e.get("id"));
        }
        if (task instanceof Map<?, ?> t) {
            b.append('/').append(t.get("id"));
        }
        return b.toString();
    }
}
