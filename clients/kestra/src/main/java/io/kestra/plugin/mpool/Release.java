package io.kestra.plugin.mpool;

import io.kestra.core.models.annotations.Example;
import io.kestra.core.models.annotations.Plugin;
import io.kestra.core.models.property.Property;
import io.kestra.core.models.tasks.RunnableTask;
import io.kestra.core.models.tasks.VoidOutput;
import io.kestra.core.runners.RunContext;
import io.swagger.v3.oas.annotations.media.Schema;
import jakarta.validation.constraints.NotNull;
import lombok.*;
import lombok.experimental.SuperBuilder;
import mpool.v1.PoolOuterClass.ReleaseRequest;

@SuperBuilder
@ToString
@EqualsAndHashCode
@Getter
@NoArgsConstructor
@Schema(
    title = "Release a lease taken by an Acquire task.",
    description = "mpool resets the VM to its clean snapshot in the background. Releasing an ended lease succeeds, so this is safe in `finally`."
)
@Plugin(
    examples = @Example(
        title = "Release in `finally`, whatever happened before.",
        full = true,
        code = """
            id: release_always
            namespace: company.team

            tasks:
              - id: vm
                type: io.kestra.plugin.mpool.Acquire
                pool: ci

            finally:
              - id: release
                type: io.kestra.plugin.mpool.Release
                leaseId: "{{ outputs.vm.leaseId }}"
            """
    )
)
public class Release extends AbstractMpoolTask implements RunnableTask<VoidOutput> {
    @Schema(title = "The lease id from an Acquire task.")
    @NotNull
    protected Property<String> leaseId;

    @Override
    public VoidOutput run(RunContext runContext) throws Exception {
        String lease = runContext.render(leaseId).as(String.class).orElseThrow(() -> new IllegalArgumentException("leaseId is required"));
        MpoolConnection.OnLease on = MpoolConnection.onLease(runContext, this, lease);
        try (MpoolClient client = on.client()) {
            client.stub().release(ReleaseRequest.newBuilder().setLeaseId(on.leaseId()).build());
            runContext.logger().info("Released lease {}", lease);
        }
        return null;
    }
}
