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

import java.net.URI;
import java.time.Duration;
import java.util.Map;

@SuperBuilder
@ToString
@EqualsAndHashCode
@Getter
@NoArgsConstructor
@Schema(
    title = "Run commands in a clean VM from an mpool pool, in one task.",
    description = """
        Leases a warm VM from the pool, writes the input files, runs the commands or the script with their \
        output streamed line by line into the task log, brings the output files back into Kestra's internal \
        storage, and releases the lease (mpool then resets the VM to its clean snapshot). \
        Lines such as `::{"outputs":{"key":"value"}}::` become task outputs, as in Kestra's script tasks. \
        Killing the execution (or the task's `timeout`) cancels the remote command and releases the lease. \
        The lease's request id is the task run id plus the attempt number, so a re-submitted attempt gets its VM back, \
        and the command runs as an mpool session kept running in the VM if the worker dies or its connection to \
        mpool breaks: the re-submitted (or next) attempt attaches to it, replays its output (announced as a replay \
        in the log), reads the output files and gets its exit code, and the command runs once. Such an attempt \
        leaves the lease for the next one, which releases it (or it expires after its `ttl` once the command ended)."""
)
@Plugin(
    examples = {
        @Example(
            title = "Build in a clean VM, read an output and keep a report file.",
            full = true,
            code = """
                id: build_in_vm
                namespace: company.team

                tasks:
                  - id: build
                    type: io.kestra.plugin.mpool.Run
                    endpoint: https://mpool.example:7070
                    token: "{{ secret('MPOOL_TOKEN') }}"
                    pool: ubuntu-24
                    inputFiles:
                      input.csv: |
                        a,b
                        1,2
                    commands:
                      - wc -l input.csv > report.txt
                      - echo '::{"outputs":{"lines":'$(wc -l < input.csv)'}}::'
                    outputFiles:
                      - report.txt
                    timeout: PT10M

                  - id: show
                    type: io.kestra.plugin.core.log.Log
                    message: "{{ outputs.build.vars.lines }} lines on {{ outputs.build.vm }}, report {{ outputs.build.outputFiles['report.txt'] }}"
                """
        ),
        @Example(
            title = "Set the connection once for a namespace with pluginDefaults.",
            full = true,
            code = """
                id: defaults
                namespace: company.team

                pluginDefaults:
                  - type: io.kestra.plugin.mpool
                    values:
                      endpoint: https://mpool.example:7070
                      token: "{{ secret('MPOOL_TOKEN') }}"
                      ca: "{{ secret('MPOOL_CA') }}"

                tasks:
                  - id: uname
                    type: io.kestra.plugin.mpool.Run
                    pool: ci
                    script: |
                      uname -a
                      cat /etc/os-release
                """
        )
    }
)
public class Run extends AbstractCommandTask implements RunnableTask<Run.Output> {
    @Schema(title = "The pool to lease a VM from (see `mpool pools`).")
    @NotNull
    protected Property<String> pool;

    @Schema(
        title = "Idempotency key of the lease.",
        description = "Default: the task run id and the attempt number, so a re-submitted attempt gets the same lease."
    )
    protected Property<String> requestId;

    @Schema(title = "How long to wait for a free VM; default the pool's `max_wait`.")
    protected Property<Duration> waitFor;

    @Schema(title = "Lease time to live; default the pool's `default_ttl`. A running command keeps its lease alive.")
    protected Property<Duration> ttl;

    @Override
    public Output run(RunContext runContext) throws Exception {
        long start = System.nanoTime();
        AcquireRequest.Builder acquire = AcquireRequest.newBuilder()
            .setPool(runContext.render(pool).as(String.class).orElseThrow(() -> new IllegalArgumentException("pool is required")))
            .setHolder(MpoolConnection.holder(runContext));
        runContext.render(waitFor).as(Duration.class).ifPresent(d -> acquire.setWait(proto(d)));
        runContext.render(ttl).as(Duration.class).ifPresent(d -> acquire.setTtl(proto(d)));
        String fixed = runContext.render(requestId).as(String.class).orElse(null);
        boolean lost = false;
        try {
            MpoolConnection.AttemptLease al = MpoolConnection.acquire(runContext, this, acquire.build(), Attempt.of(runContext), fixed, "");
            Fleet.Leased leased = al.leased();
            return runLeased(runContext, leased, al.attempt(), start);
        } catch (Exception e) {
            lost = MpoolClient.connectionLost(e);
            throw e;
        } finally {
            if (!lost) {
                Attempt.close(runContext);
            }
        }
    }

    private Output runLeased(RunContext runContext, Fleet.Leased leased, Attempt attempt, long start) throws Exception {
        try (MpoolClient client = leased.client()) {
            Lease lease = leased.lease();
            Duration acquired = Duration.ofNanos(System.nanoTime() - start);
            runContext.logger().info("Leased VM {} from pool {} on {} ({}, lease {})", lease.getVm(), lease.getPool(), leased.endpoint(), lease.getServed(), lease.getId());
            Result r;
            boolean lost = false;
            try {
                r = runOnLease(runContext, client, lease.getId(), true, attempt);
            } catch (Exception e) {
                lost = attempt != null && MpoolClient.connectionLost(e);
                if (lost) {
                    runContext.logger().warn("The connection to mpool broke ({}); the command runs on in VM {} (lease {}) and the task's next attempt follows it",
                        e.getMessage(), lease.getVm(), lease.getId());
                }
                throw e;
            } finally {
                Exception e = lost ? null : client.releaseQuietly(lease.getId());
                if (e != null) {
                    runContext.logger().warn("Releasing lease {}: {}", lease.getId(), e.getMessage());
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
                .vm(lease.getVm())
                .leaseId(lease.getId())
                .endpoint(leased.endpoint())
                .served(lease.getServed().name())
                .timings(Timings.builder()
                    .acquire(acquired)
                    .upload(r.upload())
                    .exec(r.exec())
                    .download(r.download())
                    .total(Duration.ofNanos(System.nanoTime() - start))
                    .build())
                .build();
        }
    }

    static com.google.protobuf.Duration proto(Duration d) {
        return com.google.protobuf.Duration.newBuilder().setSeconds(d.getSeconds()).setNanos(d.getNano()).build();
    }

    @Builder
    @Getter
    public static class Output implements io.kestra.core.models.tasks.Output {
        @Schema(title = "The command's exit code (-1 when a signal killed it).")
        private final int exitCode;
        @Schema(title = "The signal that killed the command (e.g. `TERM`), if any.")
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
        @Schema(title = "The VM's instance name.")
        private final String vm;
        @Schema(title = "The lease id (already released).")
        private final String leaseId;
        @Schema(title = "The endpoint of the host it ran on.")
        private final String endpoint;
        @Schema(title = "How the VM was served: SERVED_HOT (running), SERVED_WARM (resumed), SERVED_COLD (waited), SERVED_REPEAT.")
        private final String served;
        @Schema(title = "Where the time went.")
        private final Timings timings;
    }

    @Builder
    @Getter
    public static class Timings {
        @Schema(title = "Leasing the VM.")
        private final Duration acquire;
        @Schema(title = "Writing the input files.")
        private final Duration upload;
        @Schema(title = "The command.")
        private final Duration exec;
        @Schema(title = "Reading the output files.")
        private final Duration download;
        @Schema(title = "The whole task.")
        private final Duration total;
    }
}
