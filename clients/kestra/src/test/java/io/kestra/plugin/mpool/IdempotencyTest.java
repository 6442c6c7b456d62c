package io.kestra.plugin.mpool;

import io.kestra.core.junit.annotations.KestraTest;
import io.kestra.core.models.property.Property;
import io.kestra.core.runners.RunContext;
import io.kestra.core.runners.RunContextFactory;
import jakarta.inject.Inject;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

import java.util.Map;

import static org.hamcrest.MatcherAssert.assertThat;
import static org.hamcrest.Matchers.*;

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
            "flow", Map.of("namespace", "io.kestra.plugin.mpool.tests", "id", "idem"),
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
}
