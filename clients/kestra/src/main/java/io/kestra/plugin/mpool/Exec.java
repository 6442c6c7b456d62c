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

import java.net.URI;
import java.time.Duration;
import java.util.Map;

@SuperBuilder
@ToString
@EqualsAndHashCode
@Getter
@NoArgsConstructor
@Schema(
    title = "Run commands on a VM leased by an Acquire task.",
    description = """
        Writes the input files, runs the commands with their output streamed into the task log \
        (`::{"outputs":{...}}::` lines become outputs), and brings output files back. The VM keeps its \
        files between Exec tasks until the lease is released. Killing the execution cancels the command; \
        the lease stays for the flow's Release task. The command runs as an mpool session named after the task \
        run and its attempt: if the worker dies or its connection to mpool breaks, the command runs on in the VM, \
        and the task's re-submitted (or next) attempt attaches to it, replays its output (announced as a replay \
        in the log) and gets its exit code, instead of running it again."""
)
@Plugin(
    examples = @Example(
        title = "Two steps on one leased VM.",
        full = true,
        code = """
            id: exec_steps
            namespace: company.team

            tasks:
              - id: vm
                type: io.kestra.plugin.mpool.Acquire
                endpoint: https://mpool.example:7070
                token: "{{ secret('MPOOL_TOKEN') }}"
                pool: ci
              - id: write
                type: io.kestra.plugin.mpool.Exec
                endpoint: https://mpool.example:7070
                token: "{{ secret('MPOOL_TOKEN') }}"
                leaseId: "{{ outputs.vm.leaseId }}"
                commands:
                  - echo hello > greeting.txt
              - id: read
                type: io.kestra.plugin.mpool.Exec
                endpoint: https://mpool.example:7070
                token: "{{ secret('MPOOL_TOKEN') }}"
                leaseId: "{{ outputs.vm.leaseId }}"
                commands:
                  - echo "::{\\"outputs\\":{\\"greeting\\":\\"$(cat greeting.txt)\\"}}::"

            finally:
              - id: release
                type: io.kestra.plugin.mpool.Release
                endpoint: https://mpool.example:7070
                token: "{{ secret('MPOOL_TOKEN') }}"
                leaseId: "{{ outputs.vm.leaseId }}"
            """
    )
)
public class Exec extends AbstractCommandTask implements RunnableTask<Exec.Output> {
    @Schema(title = "The lease id from an Acquire task (`{{ outputs.<acquire task id>.leaseId }}`).")
    @NotNull
    protected Property<String> leaseId;

    @Override
    public Output run(RunContext runContext) throws Exception {
        String lease = runContext.render(leaseId).as(String.class).orElseThrow(() -> new IllegalArgumentException("leaseId is required"));
        MpoolConnection.OnLease on = MpoolConnection.onLease(runContext, this, lease);
        Attempt attempt = Attempt.of(runContext);
        boolean lost = false;
        try (MpoolClient client = on.client()) {
            Result r;
            try {
                r = runOnLease(runContext, client, on.leaseId(), false, attempt);
            } catch (Exception e) {
                lost = attempt != null && MpoolClient.connectionLost(e);
                if (lost) {
                    runContext.logger().warn("The connection to mpool broke ({}); the command runs on in the VM (lease {}) and the task's next attempt follows it",
                        e.getMessage(), on.leaseId());
                }
                throw e;
            } finally {
                if (!lost) {
                    Attempt.close(runContext);
                }
            }
            return Output.builder()
                .exitCode(r.exitCode())
                .signal(r.signal())
                .timedOut(r.timedOut())
                .vars(r.vars())
                .outputFiles(r.outputFiles())
                .stdOutLineCount(r.stdOutLineCount())
                .stdErrLineCount(r.stdErrLineCount())
                .duration(r.exec())
                .build();
        }
    }

    @Builder
    @Getter
    public static class Output implements io.kestra.core.models.tasks.Output {
        @Schema(title = "The command's exit code (-1 when a signal killed it).")
        private final int exitCode;
        @Schema(title = "The signal that killed the command, if any.")
        private final String signal;
        @Schema(title = "The command was killed because its timeout passed.")
        private final boolean timedOut;
        @Schema(title = "Outputs the command printed as `::{\"outputs\":{...}}::` lines.")
        private final Map<String, Object> vars;
        @Schema(title = "Output files: file name to `kestra://` URI.")
        private final Map<String, URI> outputFiles;
        @Schema(title = "Lines written to stdout.")
        private final int stdOutLineCount;
        @Schema(title = "Lines written to stderr.")
        private final int stdErrLineCount;
        @Schema(title = "How long the command ran.")
        private final Duration duration;
    }
}
