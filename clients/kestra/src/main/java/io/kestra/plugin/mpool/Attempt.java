package io.kestra.plugin.mpool;

import io.kestra.core.runners.RunContext;

import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.Map;

/**
 * Which attempt of a task run this is, as mpool knows it: the lease's request id and the
 * command's session id are made from the task run id and this number.
 *
 * <p>Kestra re-submits the task of a worker that died with one attempt more than it had
 * ({@code JdbcExecutor.resubmitWorkerTask} sends {@code TaskRun.onRunningResend()}, which appends
 * a RESUBMITTED attempt), so {@code taskrun.attemptsCount} alone would give the re-submission
 * new keys: a second VM and a second run of the command. An attempt therefore records itself as
 * open in Kestra's state store when it starts and removes the record when it ends; an attempt
 * that finds the open record of an earlier attempt of its task run is that attempt again, and
 * takes its number. An attempt whose connection to mpool was lost while its command runs on
 * leaves its record open, so the next attempt (a re-submission or a retry) follows that command
 * instead of starting a second one.
 *
 * @param taskRunId the task run id
 * @param number    the attempt number the keys use
 * @param resumed   an earlier attempt of the task run did not end: this attempt takes it over
 */
public record Attempt(String taskRunId, int number, boolean resumed) {
    /** The state store entry (one per task run) naming the attempt that is open. */
    static final String STATE = "mpool-open-attempt";
    /** Session ids: letters, digits, '.', '_', '-', at most this long. */
    static final int MAX_SESSION = 64;

    /**
     * The attempt this run context runs: the open one of its task run if an earlier attempt did
     * not end, else {@code taskrun.attemptsCount}, recorded as open. Null outside a task run.
     * Asking again within the same attempt gives the same answer.
     */
    public static Attempt of(RunContext rc) {
        Attempt current = current(rc);
        if (current == null) {
            return null;
        }
        Integer open = recorded(rc, current.taskRunId());
        if (open != null && open <= current.number()) {
            return new Attempt(current.taskRunId(), open, open < current.number());
        }
        record(rc, current.taskRunId(), current.number());
        return current;
    }

    /**
     * A fresh attempt in place of a resumed one whose lease is gone (nothing left to follow):
     * {@code taskrun.attemptsCount}, recorded as open.
     */
    public static Attempt fresh(RunContext rc) {
        Attempt current = current(rc);
        if (current != null) {
            record(rc, current.taskRunId(), current.number());
        }
        return current;
    }

    /** Ends the task run's open attempt: its next attempt is a new one (a retry). */
    public static void close(RunContext rc) {
        Attempt current = current(rc);
        if (current == null) {
            return;
        }
        try {
            rc.stateStore().deleteState(STATE, current.taskRunId(), null);
        } catch (Exception e) {
            rc.logger().warn("Could not clear the open attempt of task run {} in Kestra's state store: {}", current.taskRunId(), e.toString());
        }
    }

    /** The task run id and {@code taskrun.attemptsCount} of the run context, or null. */
    private static Attempt current(RunContext rc) {
        Object taskrun = rc.getVariables().get("taskrun");
        if (!(taskrun instanceof Map<?, ?> m) || m.get("id") == null) {
            return null;
        }
        int count = m.get("attemptsCount") instanceof Number n ? n.intValue() : 0;
        return new Attempt(m.get("id").toString(), count, false);
    }

    /** The idempotency key of the lease: task run id, attempt number, {@code suffix}. */
    public String requestId(String suffix) {
        return taskRunId + "-" + number + suffix;
    }

    /**
     * The session id of the attempt's command: "kestra-", the task run id, the attempt number and
     * {@code suffix}, in the characters mpool takes (others become '_'), at most 64.
     */
    public String session(String suffix) {
        String s = ("kestra-" + taskRunId + "-" + number + suffix).replaceAll("[^A-Za-z0-9._-]", "_");
        if (s.length() <= MAX_SESSION) {
            return s;
        }
        String hash = String.format("%08x", s.hashCode());
        return s.substring(0, MAX_SESSION - hash.length() - 1) + "-" + hash;
    }

    private static Integer recorded(RunContext rc, String taskRunId) {
        try (InputStream in = rc.stateStore().getState(STATE, taskRunId, null)) {
            return Integer.valueOf(new String(in.readAllBytes(), StandardCharsets.UTF_8).trim());
        } catch (Exception e) {
            // none recorded (or unreadable): a new attempt
            return null;
        }
    }

    private static void record(RunContext rc, String taskRunId, int number) {
        try {
            rc.stateStore().putState(STATE, taskRunId, null, Integer.toString(number).getBytes(StandardCharsets.UTF_8));
        } catch (Exception e) {
            rc.logger().warn("Could not record attempt {} of task run {} in Kestra's state store ({}); a re-submission of this attempt would start afresh", number, taskRunId, e.toString());
        }
    }
}
