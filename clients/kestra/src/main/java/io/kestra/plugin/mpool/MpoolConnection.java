package io.kestra.plugin.mpool;

import io.kestra.core.models.property.Property;
import io.kestra.core.runners.RunContext;

import java.util.Map;

/** Connection settings shared by the tasks and the task runner. */
public interface MpoolConnection {
    /** Where `mpool serve` listens by default. */
    String DEFAULT_ENDPOINT = "unix:/run/mpool/mpool.sock";

    Property<String> getEndpoint();

    Property<String> getToken();

    Property<String> getCa();

    /** Renders the settings and connects. */
    static MpoolClient open(RunContext runContext, Property<String> endpoint, Property<String> token, Property<String> ca) throws Exception {
        String e = runContext.render(endpoint).as(String.class).orElse(DEFAULT_ENDPOINT);
        String t = runContext.render(token).as(String.class).orElse(null);
        String c = runContext.render(ca).as(String.class).orElse(null);
        return MpoolClient.connect(e, t, c);
    }

    /**
     * The idempotency key of this task attempt: the task run id and its attempt number, so a
     * re-submitted attempt (a worker restart) gets its lease back instead of a second VM.
     */
    @SuppressWarnings("unchecked")
    static String requestId(RunContext runContext, String suffix) {
        Object taskrun = runContext.getVariables().get("taskrun");
        if (taskrun instanceof Map<?, ?> m && m.get("id") != null) {
            Object attempt = m.get("attemptsCount");
            return m.get("id") + "-" + (attempt == null ? 0 : attempt) + suffix;
        }
        return null;
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
