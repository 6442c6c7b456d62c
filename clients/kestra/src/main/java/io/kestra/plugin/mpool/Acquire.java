package io.kestra.plugin.mpool;

import io.kestra.core.models.annotations.Example;
import io.kestra.core.models.annotations.Plugin;
import io.kestra.core.models.property.Property;
import io.kestra.core.models.tasks.RunnableTask;
import io.kestra.core.runners.RunContext;
import io.swagger.v3.oas.annotations.media.Schema;
import jakarta.validation.constraints.NotNull;
import lombok.*;
import lombok.experimental.SuperBuilder;
import mpool.v1.PoolOuterClass.AcquireRequest;
import mpool.v1.PoolOuterClass.Lease;

import java.time.Duration;
import java.time.Instant;

@SuperBuilder
@ToString
@EqualsAndHashCode
@Getter
@NoArgsConstructor
@Schema(
    title = "Lease a clean VM from an mpool pool for several steps.",
    description = """
        Returns a lease id for `Exec` and `Release` tasks (with `endpoints`, one that names its host). Always release it (a `finally` or `errors` \
        branch); the lease's time to live is the backstop. The request id defaults to the task run id plus \
        the attempt number, so a re-submitted attempt gets the same lease back."""
)
@Plugin(
    examples = @Example(
        title = "Acquire, run two steps on the same VM, release in `finally`.",
        full = true,
        code = """
            id: multi_step
            namespace: company.team

            pluginDefaults:
              - type: io.kestra.plugin.mpool
                values:
                  endpoint: https://mpool.example:7070
                  token: "{{ secret('MPOOL_TOKEN') }}"

            tasks:
              - id: vm
                type: io.kestra.plugin.mpool.Acquire
                pool: ci
                ttl: PT30M
              - id: checkout
                type: io.kestra.plugin.mpool.Exec
                leaseId: "{{ outputs.vm.leaseId }}"
                commands:
                  - git clone https://github.com/kestra-io/examples src
              - id: test
                type: io.kestra.plugin.mpool.Exec
                leaseId: "{{ outputs.vm.leaseId }}"
                commands:
                  - cd src && ls

            finally:
              - id: release
                type: io.kestra.plugin.mpool.Release
                leaseId: "{{ outputs.vm.leaseId }}"
            """
    )
)
public class Acquire extends AbstractMpoolTask implements RunnableTask<Acquire.Output> {
    @Schema(title = "The pool to lease a VM from.")
    @NotNull
    protected Property<String> pool;

    @Schema(title = "Idempotency key; default the task run id and the attempt number.")
    protected Property<String> requestId;

    @Schema(title = "How long to wait for a free VM; default the pool's `max_wait`.")
    protected Property<Duration> waitFor;

    @Schema(title = "Lease time to live; default the pool's `default_ttl`. Renewed by every Exec while it runs.")
    protected Property<Duration> ttl;

    @Override
    public Output run(RunContext runContext) throws Exception {
        AcquireRequest.Builder b = AcquireRequest.newBuilder()
            .setPool(runContext.render(pool).as(String.class).orElseThrow(() -> new IllegalArgumentException("pool is required")))
            .setHolder(MpoolConnection.holder(runContext));
        String rid = runContext.render(requestId).as(String.class).orElse(MpoolConnection.requestId(runContext, ""));
        if (rid != null) {
            b.setRequestId(rid);
        }
        runContext.render(waitFor).as(Duration.class).ifPresent(d -> b.setWait(Run.proto(d)));
        runContext.render(ttl).as(Duration.class).ifPresent(d -> b.setTtl(Run.proto(d)));
        Fleet.Leased leased;
        try {
            leased = MpoolConnection.acquire(runContext, this, b.build());
        } catch (Exception e) {
            if (!MpoolClient.connectionLost(e)) {
                Attempt.close(runContext);
            }
            throw e;
        }
        Attempt.close(runContext);
        try (MpoolClient ignored = leased.client()) {
            Lease lease = leased.lease();
            boolean several = !MpoolConnection.endpoints(runContext, endpoints).isEmpty();
            runContext.logger().info("Leased VM {} from pool {} on {} ({}, lease {})", lease.getVm(), lease.getPool(), leased.endpoint(), lease.getServed(), lease.getId());
            return Output.builder()
                .leaseId(several ? LeaseHandle.encode(lease.getId(), leased.endpoint()) : lease.getId())
                .endpoint(leased.endpoint())
                .vm(lease.getVm())
                .pool(lease.getPool())
                .served(lease.getServed().name())
                .requestId(lease.getRequestId())
                .expiresAt(Instant.ofEpochSecond(lease.getExpiresAt().getSeconds(), lease.getExpiresAt().getNanos()))
                .build();
        }
    }

    @Builder
    @Getter
    public static class Output implements io.kestra.core.models.tasks.Output {
        @Schema(
            title = "The lease id: pass it to Exec and Release.",
            description = "With `endpoints`, a handle `ID@HOST` that names the host holding the lease (URL-safe)."
        )
        private final String leaseId;
        @Schema(title = "The endpoint of the host holding the lease.")
        private final String endpoint;
        @Schema(title = "The VM's instance name.")
        private final String vm;
        @Schema(title = "The pool.")
        private final String pool;
        @Schema(title = "How the VM was served (SERVED_HOT, SERVED_WARM, SERVED_COLD, SERVED_REPEAT).")
        private final String served;
        @Schema(title = "The idempotency key used.")
        private final String requestId;
        @Schema(title = "When the lease expires unless renewed or busy.")
        private final Instant expiresAt;
    }
}
