package io.kestra.plugin.mpool.runner;

import io.kestra.core.models.annotations.Example;
import io.kestra.core.models.annotations.Plugin;
import io.kestra.core.models.annotations.PluginProperty;
import io.kestra.core.models.property.Property;
import io.kestra.core.models.tasks.runners.*;
import io.kestra.core.runners.RunContext;
import io.kestra.plugin.mpool.Attempt;
import io.kestra.plugin.mpool.Fleet;
import io.kestra.plugin.mpool.MpoolClient;
import io.kestra.plugin.mpool.MpoolConnection;
import io.swagger.v3.oas.annotations.media.Schema;
import jakarta.validation.constraints.NotNull;
import lombok.*;
import lombok.experimental.SuperBuilder;
import mpool.v1.PoolOuterClass.AcquireRequest;
import mpool.v1.PoolOuterClass.Command;
import mpool.v1.PoolOuterClass.ExitStatus;
import mpool.v1.PoolOuterClass.Lease;

import java.nio.file.FileSystems;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.PathMatcher;
import java.time.Duration;
import java.util.*;

@SuperBuilder
@ToString
@EqualsAndHashCode
@Getter
@NoArgsConstructor
@Schema(
    title = "Run script tasks in a clean VM leased from an mpool pool.",
    description = """
        A task runner for any script task (`io.kestra.plugin.scripts.shell.Commands`, Python, Node, ...): \
        it leases a warm VM from the pool, uploads the task's working directory (scripts, input files, \
        namespace files) to `{{ workingDir }}` in the VM, runs the commands there with their output \
        streamed into the task log (`::{"outputs":{...}}::` lines become outputs), downloads the output \
        files and `{{ outputDir }}`, and releases the lease, after which mpool resets the VM. Killing the \
        execution cancels the remote command and releases the lease. The lease's request id is the task \
        run id plus the attempt number, so a re-submitted attempt gets its VM back; the command runs as an mpool \
        session that runs on in the VM if the worker dies or its connection to mpool breaks, and the re-submitted \
        (or next) attempt attaches to it, replays its output (announced as a replay in the log), downloads the \
        output files and gets its exit code, like Kestra's Kubernetes task runner resuming its pod. \
        `containerImage` is ignored: the pool decides the image."""
)
@Plugin(
    examples = {
        @Example(
            title = "A Shell script task in a pooled VM.",
            full = true,
            code = """
                id: shell_in_vm
                namespace: company.team

                tasks:
                  - id: shell
                    type: io.kestra.plugin.scripts.shell.Commands
                    taskRunner:
                      type: io.kestra.plugin.mpool.runner.Mpool
                      endpoint: https://mpool.example:7070
                      token: "{{ secret('MPOOL_TOKEN') }}"
                      pool: ubuntu-24
                    commands:
                      - uname -a > {{ outputDir }}/uname.txt
                      - echo '::{"outputs":{"kernel":"'$(uname -r)'"}}::'
                """
        ),
        @Example(
            title = "A Python script in a pooled VM, with an input file.",
            full = true,
            code = """
                id: python_in_vm
                namespace: company.team

                tasks:
                  - id: python
                    type: io.kestra.plugin.scripts.python.Script
                    taskRunner:
                      type: io.kestra.plugin.mpool.runner.Mpool
                      pool: python
                    inputFiles:
                      data.csv: "a,b\\n1,2\\n"
                    outputFiles:
                      - summary.txt
                    script: |
                      rows = open("data.csv").read().splitlines()
                      open("summary.txt", "w").write(f"{len(rows)} rows\\n")
                """
        )
    }
)
public class Mpool extends TaskRunner<TaskRunnerDetailResult> implements RemoteRunnerInterface, MpoolConnection {
    @Schema(title = "The pool to lease a VM from.")
    @NotNull
    private Property<String> pool;

    @Schema(title = "mpool's gRPC endpoint: `unix:PATH`, `http://HOST:PORT` (loopback, with a token) or `https://HOST:PORT`.")
    @NotNull
    @Builder.Default
    @PluginProperty(group = "connection")
    private Property<String> endpoint = Property.ofValue(DEFAULT_ENDPOINT);

    @Schema(title = "Several mpool hosts to choose among (instead of `endpoint`): the one with the most ready VMs for the pool, the next if it is down or draining.")
    @PluginProperty(group = "connection")
    private Property<List<String>> endpoints;

    @Schema(title = "Bearer token for TCP endpoints; keep it in a secret.")
    @PluginProperty(secret = true, group = "connection")
    private Property<String> token;

    @Schema(title = "CA certificate (PEM text) for `https://` endpoints; default the JVM's trust store.")
    @PluginProperty(group = "connection")
    private Property<String> ca;

    @Schema(title = "How long to wait for a free VM; default the pool's `max_wait`.")
    private Property<Duration> waitFor;

    @Schema(title = "Lease time to live; default the pool's `default_ttl`. A running command keeps its lease alive.")
    private Property<Duration> ttl;

    @Schema(
        title = "Directory in the VM under which each task gets its working directory.",
        description = "The task's `{{ workingDir }}` in the VM is this directory plus the task run id (a re-submitted attempt that follows the earlier command finds its files there). Files travel with mpool's Upload and Download (SFTP, in chunks), so any directory the VM's SSH user can write works, such as the default under `/tmp`. With `mpool sim` (whose VMs are directories on its host) use a directory inside the VM's own directory: other absolute paths are the host's, which SFTP refuses."
    )
    @NotNull
    @Builder.Default
    private Property<String> remoteBaseDir = Property.ofValue("/tmp/kestra-mpool");

    @Schema(
        title = "Bring the whole working directory back, not only the output files.",
        description = "Useful when a later task of a `WorkingDirectory` reads files this one wrote."
    )
    @Builder.Default
    private Property<Boolean> syncWorkingDirectory = Property.ofValue(false);

    /**
     * The task's working directory in the VM: named after the task run (a re-submitted attempt
     * that follows the earlier attempt's command finds its files there), else after the local
     * working directory.
     */
    private String remoteWorkingDir(RunContext runContext) throws Exception {
        String base = runContext.render(remoteBaseDir).as(String.class).orElse("/tmp/kestra-mpool");
        Object taskrun = runContext.getVariables().get("taskrun");
        String name = taskrun instanceof Map<?, ?> m && m.get("id") != null
            ? m.get("id").toString().replaceAll("[^A-Za-z0-9._-]", "_")
            : runContext.workingDir().id();
        return base.replaceAll("/+$", "") + "/" + name;
    }

    private String remoteOutputDir(RunContext runContext, TaskCommands commands) throws Exception {
        Path rel = commands.getWorkingDirectory().relativize(commands.getOutputDirectory());
        return remoteWorkingDir(runContext) + "/" + rel.toString().replace('\\', '/');
    }

    @Override
    protected Map<String, Object> runnerAdditionalVars(RunContext runContext, TaskCommands taskCommands) throws io.kestra.core.exceptions.IllegalVariableEvaluationException {
        Map<String, Object> vars = new HashMap<>();
        try {
            vars.put(ScriptService.VAR_WORKING_DIR, remoteWorkingDir(runContext));
            if (taskCommands.outputDirectoryEnabled()) {
                vars.put(ScriptService.VAR_OUTPUT_DIR, remoteOutputDir(runContext, taskCommands));
            }
        } catch (io.kestra.core.exceptions.IllegalVariableEvaluationException e) {
            throw e;
        } catch (Exception e) {
            throw new IllegalStateException(e);
        }
        return vars;
    }

    @Override
    protected Map<String, String> runnerEnv(RunContext runContext, TaskCommands taskCommands) throws io.kestra.core.exceptions.IllegalVariableEvaluationException {
        Map<String, String> env = new HashMap<>();
        try {
            env.put(ScriptService.ENV_WORKING_DIR, remoteWorkingDir(runContext));
            if (taskCommands.outputDirectoryEnabled()) {
                env.put(ScriptService.ENV_OUTPUT_DIR, remoteOutputDir(runContext, taskCommands));
            }
        } catch (io.kestra.core.exceptions.IllegalVariableEvaluationException e) {
            throw e;
        } catch (Exception e) {
            throw new IllegalStateException(e);
        }
        return env;
    }

    @Override
    public TaskRunnerResult<TaskRunnerDetailResult> run(RunContext runContext, TaskCommands taskCommands, List<String> filesToDownload) throws Exception {
        AcquireRequest.Builder acquire = AcquireRequest.newBuilder()
            .setPool(runContext.render(pool).as(String.class).orElseThrow(() -> new IllegalArgumentException("taskRunner.pool is required")))
            .setHolder(MpoolConnection.holder(runContext));
        runContext.render(waitFor).as(Duration.class).ifPresent(d -> acquire.setWait(proto(d)));
        runContext.render(ttl).as(Duration.class).ifPresent(d -> acquire.setTtl(proto(d)));

        checkKilled("Execution was killed before a VM was leased.");
        boolean lost = false;
        try {
            MpoolConnection.AttemptLease al = MpoolConnection.acquire(runContext, this, acquire.build(), Attempt.of(runContext), null, "-runner");
            return runLeased(runContext, taskCommands, filesToDownload, al.leased(), al.attempt());
        } catch (Exception e) {
            lost = MpoolClient.connectionLost(e);
            throw e;
        } finally {
            if (!lost) {
                Attempt.close(runContext);
            }
        }
    }

    private TaskRunnerResult<TaskRunnerDetailResult> runLeased(RunContext runContext, TaskCommands taskCommands, List<String> filesToDownload,
                                                             Fleet.Leased leased, Attempt attempt) throws Exception {
        var logger = runContext.logger();
        AbstractLogConsumer logs = taskCommands.getLogConsumer();
        String remoteWd = remoteWorkingDir(runContext);
        Path localWd = taskCommands.getWorkingDirectory();
        try (MpoolClient client = leased.client()) {
            Lease lease = leased.lease();
            String leaseId = lease.getId();
            String session = attempt == null ? null : attempt.session("");
            String execId = session != null ? session : "kestra-" + UUID.randomUUID();
            onKill(() -> {
                client.cancelQuietly(leaseId, execId);
                client.releaseQuietly(leaseId);
            });
            logger.info("Leased VM {} from pool {} ({}, lease {})", lease.getVm(), lease.getPool(), lease.getServed(), leaseId);
            MpoolClient.Follower follower = new MpoolClient.Follower(logs::accept, logger);
            boolean lost = false;
            try {
                ExitStatus exit = null;
                if (attempt != null && attempt.resumed()) {
                    logger.info("Attempt {} of task run {} did not end (its worker stopped): following its command, session {} on lease {}",
                        attempt.number(), attempt.taskRunId(), session, leaseId);
                    exit = client.attach(leaseId, session, follower);
                    if (exit == null) {
                        logger.info("Session {} is not on lease {}: the earlier attempt had not started its command; starting it", session, leaseId);
                    }
                }
                if (exit == null) {
                    // The working directory: scripts, input files, namespace files.
                    client.capture(leaseId, shell("mkdir -p \"$1\"", remoteWd));
                    for (Path rel : taskCommands.relativeWorkingDirectoryFilesPaths(true)) {
                        Path file = localWd.resolve(rel);
                        if (Files.isRegularFile(file)) {
                            client.upload(leaseId, file, remoteWd + "/" + rel.toString().replace('\\', '/'));
                        }
                    }
                    if (taskCommands.outputDirectoryEnabled()) {
                        client.capture(leaseId, shell("mkdir -p \"$1\"", remoteOutputDir(runContext, taskCommands)));
                    }
                    checkKilled("Execution was killed before the command started.");

                    List<String> argv = runContext.render(taskCommands.getCommands()).asList(String.class);
                    Command.Builder command = Command.newBuilder()
                        .addAllArgv(argv)
                        .setWorkdir(remoteWd)
                        .putAllEnv(this.env(runContext, taskCommands));
                    Duration timeout = taskCommands.getTimeout();
                    if (timeout != null && !timeout.isZero()) {
                        command.setTimeout(proto(timeout));
                    }
                    exit = session != null
                        ? client.startSession(leaseId, session, command.build(), follower)
                        : client.exec(leaseId, execId, command.build(), logs::accept);
                }

                // Output files (also after a failure, as the Docker runner does).
                download(runContext, client, leaseId, taskCommands, filesToDownload, remoteWd);
                if (exit.getCode() != 0) {
                    if (exit.getTimedOut()) {
                        logger.warn("The command timed out after {}", taskCommands.getTimeout());
                    } else if (exit.getCancelled()) {
                        logger.warn("The command was cancelled");
                    }
                    throw new TaskException(exit.getCode(), logs);
                }
                return new TaskRunnerResult<>(exit.getCode(), logs);
            } catch (Exception e) {
                lost = attempt != null && MpoolClient.connectionLost(e);
                if (lost) {
                    logger.warn("The connection to mpool broke ({}); the command runs on in VM {} (lease {}) and the task's next attempt follows it",
                        e.getMessage(), lease.getVm(), leaseId);
                }
                throw e;
            } finally {
                if (!lost) {
                    try {
                        client.capture(leaseId, shell("rm -rf \"$1\"", remoteWd));
                    } catch (RuntimeException ignored) {
                        // the lease may be gone (killed); the VM is reset anyway
                    }
                    Exception e = client.releaseQuietly(leaseId);
                    if (e != null) {
                        logger.warn("Releasing lease {}: {}", leaseId, e.getMessage());
                    }
                }
            }
        }
    }

    private void download(RunContext runContext, MpoolClient client, String leaseId, TaskCommands taskCommands, List<String> filesToDownload, String remoteWd) throws Exception {
        Path localWd = taskCommands.getWorkingDirectory();
        boolean all = runContext.render(syncWorkingDirectory).as(Boolean.class).orElse(false);
        List<PathMatcher> matchers = new ArrayList<>();
        if (filesToDownload != null) {
            for (String g : filesToDownload) {
                matchers.add(FileSystems.getDefault().getPathMatcher("glob:" + g));
            }
        }
        String outRel = taskCommands.outputDirectoryEnabled()
            ? localWd.relativize(taskCommands.getOutputDirectory()).toString().replace('\\', '/') + "/"
            : null;
        if (!all && matchers.isEmpty() && outRel == null) {
            return;
        }
        for (String rel : client.listFiles(leaseId, remoteWd)) {
            boolean wanted = all
                || (outRel != null && rel.startsWith(outRel))
                || matchers.stream().anyMatch(m -> m.matches(Path.of(rel)));
            if (wanted) {
                client.download(leaseId, remoteWd + "/" + rel, localWd.resolve(rel));
            }
        }
    }

    private static Command shell(String script, String arg) {
        return Command.newBuilder().addArgv("sh").addArgv("-c").addArgv(script).addArgv("sh").addArgv(arg).build();
    }

    private static com.google.protobuf.Duration proto(Duration d) {
        return com.google.protobuf.Duration.newBuilder().setSeconds(d.getSeconds()).setNanos(d.getNano()).build();
    }
}
