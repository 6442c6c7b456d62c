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
        Acquire acquire = Acquire.builder()
            .id("vm").type(Acquire.class.getName())
            .endpoint(Property.ofValue(stack.grpcEndpoint()))
            .token(Property.ofValue(stack.token))
            .pool(Property.ofValue(MpoolStack.POOL))
            .build();
        Acquire.Output first = acquire.run(context("tr-idem", 1));
        Acquire.Output again = acquire.run(context("tr-idem", 1));
        assertThat(first.getRequestId(), is("tr-idem-1"));
        assertThat(again.getLeaseId(), is(first.getLeaseId()));
        assertThat(again.getServed(), is("SERVED_REPEAT"));
        Acquire.Output retry = acquire.run(context("tr-idem", 2));
        assertThat(retry.getLeaseId(), not(first.getLeaseId()));

        for (String lease : new String[]{first.getLeaseId(), retry.getLeaseId()}) {
            Release.builder()
                .id("release").type(Release.class.getName())
                .endpoint(Property.ofValue(stack.grpcEndpoint()))
                .token(Property.ofValue(stack.token))
                .leaseId(Property.ofValue(lease))
                .build()
                .run(context("tr-idem", 1));
            assertThat(stack.leases(), not(containsString(lease)));
        }
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
