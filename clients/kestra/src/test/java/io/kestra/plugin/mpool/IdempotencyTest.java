package io.kestra.plugin.mpool;

import io.kestra.core.junit.annotations.KestraTest;
import io.kestra.core.models.property.Property;
import io.kestra.core.runners.RunContext;
import io.kestra.core.runners.RunContextFactory;
import jakarta.inject.Inject;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.UUID;

import io.grpc.Status;
import io.grpc.StatusRuntimeException;

import static io.kestra.core.tenant.TenantService.MAIN_TENANT;
import static org.hamcrest.MatcherAssert.assertThat;
import static org.hamcrest.Matchers.*;
import static org.junit.jupiter.api.Assertions.assertThrows;

/**
 * The lease's request id comes from the task run id and the attempt number: the same attempt run
 * again (a worker restart re-submits it) gets the same lease back; another attempt gets another.
 */
@ExtendWith(MpoolStackExtension.class)
@KestraTest
class IdempotencyTest {
    @Inject
    RunContextFactory runContextFactory;

    private RunContext context(String taskRunId, int attempt) {
        return runContextFactory.of(Map.of(
            "taskrun", Map.of("id", taskRunId, "attemptsCount", attempt),
            "flow", Map.of("namespace", "io.kestra.plugin.mpool.tests", "id", "idem", "tenantId", MAIN_TENANT),
            "execution", Map.of("id", "exec-" + taskRunId),
            "task", Map.of("id", "vm")));
    }

    @Test
    void theSameAttemptGetsTheSameLease() throws Exception {
        MpoolStack stack = MpoolStack.get();
        // A task run id of its own: Kestra's state store (Attempt's record) outlives a test run.
        String taskRun = "tr-idem-" + UUID.randomUUID();
        Acquire acquire = Acquire.builder()
            .id("vm").type(Acquire.class.getName())
            .endpoint(Property.ofValue(stack.grpcEndpoint()))
            .token(Property.ofValue(stack.token))
            .pool(Property.ofValue(MpoolStack.POOL))
            .build();
        Acquire.Output first = acquire.run(context(taskRun, 1));
        Acquire.Output again = acquire.run(context(taskRun, 1));
        assertThat(first.getRequestId(), is(taskRun + "-1"));
        assertThat(again.getLeaseId(), is(first.getLeaseId()));
        assertThat(again.getServed(), is("SERVED_REPEAT"));
        Acquire.Output retry = acquire.run(context(taskRun, 2));
        assertThat(retry.getLeaseId(), not(first.getLeaseId()));

        for (String lease : new String[]{first.getLeaseId(), retry.getLeaseId()}) {
            Release.builder()
                .id("release").type(Release.class.getName())
                .endpoint(Property.ofValue(stack.grpcEndpoint()))
                .token(Property.ofValue(stack.token))
                .leaseId(Property.ofValue(lease))
                .build()
                .run(context(taskRun, 1));
            assertThat(stack.leases(), not(containsString(lease)));
        }
    }

    /**
     * Kestra re-submits the task of a dead worker with one attempt more (TaskRun.onRunningResend()
     * appends a RESUBMITTED attempt): while the earlier attempt is open (it never ended), the
     * re-submission takes its number, so its request id and session; once an attempt ended, the
     * next one (a retry) is new.
     */
    @Test
    void aResubmissionTakesOverTheOpenAttemptAndARetryIsNew() {
        String taskRun = "tr-resub-" + UUID.randomUUID();
        Attempt first = Attempt.of(context(taskRun, 0));
        assertThat(first, is(new Attempt(taskRun, 0, false)));
        assertThat(Attempt.of(context(taskRun, 0)), is(first));
        Attempt resubmitted = Attempt.of(context(taskRun, 1));
        assertThat(resubmitted, is(new Attempt(taskRun, 0, true)));
        assertThat(resubmitted.requestId(""), is(first.requestId("")));
        assertThat(resubmitted.session(""), is("kestra-" + taskRun + "-0"));
        assertThat(Attempt.of(context(taskRun, 2)).number(), is(0));

        Attempt.close(context(taskRun, 2));
        assertThat(Attempt.of(context(taskRun, 3)), is(new Attempt(taskRun, 3, false)));
        Attempt.close(context(taskRun, 3));
    }

    @Test
    void sessionIdsKeepToMpoolsCharactersAndLength() {
        String s = new Attempt("a/b c" + "x".repeat(80), 12, false).session("-runner");
        assertThat(s, matchesPattern("[A-Za-z0-9._-]{1,64}"));
        assertThat(s.length(), is(64));
        assertThat(s, startsWith("kestra-a_b_cxxx"));
        assertThat(new Attempt("a/b c" + "x".repeat(80), 13, false).session("-runner"), not(s));
    }

    /**
     * With several endpoints, the same attempt goes back to the host its request id went to (the
     * Kestra state store remembers it), and only there: if that host is down it fails UNAVAILABLE
     * after its wait instead of running on another host.
     */
    @Test
    void aResubmittedAttemptGoesBackToItsHostOnly() throws Exception {
        MpoolStack stack = MpoolStack.get();
        Acquire acquire = Acquire.builder()
            .id("vm").type(Acquire.class.getName())
            .endpoints(Property.ofValue(List.of(stack.downEndpoint, stack.grpcEndpoint())))
            .token(Property.ofValue(stack.token))
            .pool(Property.ofValue(MpoolStack.POOL))
            .waitFor(Property.ofValue(Duration.ofSeconds(2)))
            .build();
        // Task run ids of their own: the state store outlives a test run (target/kestra-storage).
        String taskRun = "tr-fleet-" + UUID.randomUUID();
        Acquire.Output first = acquire.run(context(taskRun, 1));
        assertThat(first.getEndpoint(), is(stack.grpcEndpoint()));
        Acquire.Output again = acquire.run(context(taskRun, 1));
        assertThat(again.getLeaseId(), is(first.getLeaseId()));
        assertThat(again.getServed(), is("SERVED_REPEAT"));

        // An attempt whose request id went to the host that is down: it waits, then fails there.
        String lostRun = "tr-lost-" + UUID.randomUUID();
        RunContext lost = context(lostRun, 1);
        lost.stateStore().putState(Fleet.STATE, lostRun + "-1", null, stack.downEndpoint.getBytes(StandardCharsets.UTF_8));
        StatusRuntimeException e = assertThrows(StatusRuntimeException.class, () -> acquire.run(lost));
        assertThat(e.getStatus().getCode(), is(Status.Code.UNAVAILABLE));
        assertThat(e.getStatus().getDescription(), containsString("does not move to another host"));

        Release.builder()
            .id("release").type(Release.class.getName())
            .token(Property.ofValue(stack.token))
            .leaseId(Property.ofValue(first.getLeaseId()))
            .build()
            .run(context(taskRun, 1));
        assertThat(stack.leases(), not(containsString(LeaseHandle.decode(first.getLeaseId()).leaseId())));
    }
}
