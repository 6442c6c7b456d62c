package io.kestra.plugin.mpool;

import com.fasterxml.jackson.annotation.JsonIgnore;
import io.kestra.core.models.annotations.PluginProperty;
import io.kestra.core.models.property.Property;
import io.kestra.core.models.tasks.runners.DefaultLogConsumer;
import io.kestra.core.runners.FilesService;
import io.kestra.core.runners.RunContext;
import io.swagger.v3.oas.annotations.media.Schema;
import lombok.*;
import lombok.experimental.SuperBuilder;
import mpool.v1.PoolOuterClass.Command;
import mpool.v1.PoolOuterClass.ExitStatus;
import mpool.v1.PoolOuterClass.ScriptShell;

import java.net.URI;
import java.nio.file.FileSystems;
import java.nio.file.Path;
import java.nio.file.PathMatcher;
import java.time.Duration;
import java.util.*;

/**
 * What Run and Exec share: the command (commands or a script), its environment and working
 * directory, input files in and output files out, and streaming its output into the task log,
 * where `::{"outputs":{...}}::` lines become task outputs as in Kestra's script tasks.
 */
@SuperBuilder
@ToString
@EqualsAndHashCode
@Getter
@NoArgsConstructor
public abstract class AbstractCommandTask extends AbstractMpoolTask {
    @Schema(
        title = "Commands to run, one per line of a shell script.",
        description = "Joined with newlines and run by `bash` (or `sh`, see `shell`) in the VM. Give `commands` or `script`."
    )
    protected Property<List<String>> commands;

    @Schema(title = "A whole script, sent to the shell on stdin (no quoting at all). Give `commands` or `script`.")
    protected Property<String> script;

    @Schema(title = "The shell that runs the commands or the script.")
    @Builder.Default
    protected Property<Shell> shell = Property.ofValue(Shell.BASH);

    @Schema(title = "Stop at the first failing command (`set -e`).")
    @Builder.Default
    protected Property<Boolean> failFast = Property.ofValue(true);

    @Schema(title = "Environment variables of the command.")
    protected Property<Map<String, String>> env;

    @Schema(
        title = "Working directory in the VM, created if missing.",
        description = "Relative paths are relative to the VM user's home. Input files are written here, output files are read from here."
    )
    @Builder.Default
    protected Property<String> workdir = Property.ofValue("kestra");

    @Schema(
        title = "Files to put into the working directory before the command.",
        description = "A map of file name to content: a Kestra internal storage URI (`{{ outputs.task.uri }}`, `{{ inputs.file }}`) or inline text. A JSON string of such a map works too."
    )
    @PluginProperty(dynamic = true, internalStorageURI = true)
    protected Object inputFiles;

    @Schema(
        title = "Files to bring back into Kestra's internal storage after the command, as globs relative to the working directory.",
        description = "For example `out.txt`, `*.csv` or `reports/**`. The output `outputFiles` maps each file name to its `kestra://` URI."
    )
    protected Property<List<String>> outputFiles;

    @Schema(
        title = "Fail the task when the command exits non-zero.",
        description = "With `false`, the task succeeds and `exitCode` tells how the command ended."
    )
    @Builder.Default
    protected Property<Boolean> failOnNonZeroExit = Property.ofValue(true);

    @JsonIgnore
    @Getter(AccessLevel.NONE)
    @ToString.Exclude
    @EqualsAndHashCode.Exclude
    protected transient volatile Running running;

    @JsonIgnore
    @Getter(AccessLevel.NONE)
    @ToString.Exclude
    @EqualsAndHashCode.Exclude
    protected transient volatile boolean killed;

    /** The shells a script can run under. */
    public enum Shell {
        BASH,
        SH
    }

    /** What kill() needs to stop a command that is running. */
    protected record Running(MpoolClient client, String leaseId, String execId, boolean releaseOnKill) { }

    /** How a command ended, with what it produced. */
    protected record Result(
        int exitCode,
        String signal,
        boolean timedOut,
        boolean cancelled,
        Map<String, Object> vars,
        Map<String, URI> outputFiles,
        int stdOutLineCount,
        int stdErrLineCount,
        Duration upload,
        Duration exec,
        Duration download
    ) { }

    /** The remote command: a script for the chosen shell, run from the working directory. */
    protected Command command(RunContext runContext, String workdir, Duration timeout) throws Exception {
        List<String> lines = runContext.render(commands).asList(String.class);
        String text = runContext.render(script).as(String.class).orElse(null);
        boolean hasCommands = lines != null && !lines.isEmpty();
        boolean hasScript = text != null && !text.isBlank();
        if (hasCommands == hasScript) {
            throw new IllegalArgumentException("give either `commands` or `script`");
        }
        StringBuilder body = new StringBuilder();
        body.append("mkdir -p ").append(quote(workdir)).append(" && cd ").append(quote(workdir)).append(" || exit 125\n");
        if (runContext.render(failFast).as(Boolean.class).orElse(true)) {
            body.append("set -e\n");
        }
        body.append(hasCommands ? String.join("\n", lines) : text).append('\n');
        Command.Builder c = Command.newBuilder()
            .setScript(body.toString())
            .setShell(runContext.render(shell).as(Shell.class).orElse(Shell.BASH) == Shell.SH ? ScriptShell.SCRIPT_SHELL_SH : ScriptShell.SCRIPT_SHELL_BASH)
            .putAllEnv(runContext.render(env).asMap(String.class, String.class));
        if (timeout != null && !timeout.isZero()) {
            c.setTimeout(com.google.protobuf.Duration.newBuilder().setSeconds(timeout.getSeconds()).setNanos(timeout.getNano()));
        }
        return c.build();
    }

    static String quote(String s) {
        return "'" + s.replace("'", "'\\''") + "'";
    }

    /**
     * Uploads the input files, runs the command with its output in the task log, downloads the
     * output files; kill() cancels the command meanwhile.
     *
     * <p>Within a task run ({@code attempt} set) the command runs as an mpool session named after
     * the attempt, kept running in the VM if the connection to mpool breaks: a re-submitted
     * attempt ({@link Attempt#resumed()}) attaches to it (its output replayed, then live) instead
     * of uploading and running it again.
     */
    protected Result runOnLease(RunContext runContext, MpoolClient client, String leaseId, boolean releaseOnKill, Attempt attempt) throws Exception {
        String workdir = runContext.render(this.workdir).as(String.class).orElse("kestra");
        Duration timeout = runContext.render(getTimeout()).as(Duration.class).orElse(null);
        Command command = command(runContext, workdir, timeout);
        Path local = runContext.workingDir().path();
        DefaultLogConsumer logs = new DefaultLogConsumer(runContext);
        MpoolClient.Follower follower = new MpoolClient.Follower(logs::accept, runContext.logger());

        String session = attempt == null ? null : attempt.session("");
        String execId = session != null ? session : "kestra-" + UUID.randomUUID();
        running = new Running(client, leaseId, execId, releaseOnKill);
        ExitStatus exit = null;
        Duration upload = Duration.ZERO;
        long t1 = System.nanoTime();
        try {
            if (killed) {
                // kill() came before `running` was set: an earlier attempt's command is stopped here.
                if (attempt != null && attempt.resumed()) {
                    client.cancelQuietly(leaseId, session);
                }
                throw new IllegalStateException("the task was killed before its command started");
            }
            if (attempt != null && attempt.resumed()) {
                runContext.logger().info("Attempt {} of task run {} did not end (its worker stopped): following its command, session {} on lease {}",
                    attempt.number(), attempt.taskRunId(), session, leaseId);
                exit = client.attach(leaseId, session, follower);
                if (exit == null) {
                    runContext.logger().info("Session {} is not on lease {}: the earlier attempt had not started its command; starting it", session, leaseId);
                }
            }
            if (exit == null) {
                long t0 = System.nanoTime();
                Map<String, String> inputs = inputFiles == null ? Map.of() : FilesService.inputFiles(runContext, inputFiles);
                for (String name : inputs.keySet()) {
                    client.upload(leaseId, local.resolve(name), workdir + "/" + name);
                }
                upload = Duration.ofNanos(System.nanoTime() - t0);
                if (killed) {
                    throw new IllegalStateException("the task was killed before its command started");
                }
                t1 = System.nanoTime();
                exit = session != null
                    ? client.startSession(leaseId, session, command, follower)
                    : client.exec(leaseId, execId, command, logs::accept);
            }
        } finally {
            running = null;
        }
        Duration exec = Duration.ofNanos(System.nanoTime() - t1);

        long t2 = System.nanoTime();
        List<String> globs = runContext.render(outputFiles).asList(String.class);
        Map<String, URI> files = new LinkedHashMap<>();
        if (globs != null && !globs.isEmpty()) {
            List<PathMatcher> matchers = globs.stream().map(g -> FileSystems.getDefault().getPathMatcher("glob:" + g)).toList();
            for (String rel : client.listFiles(leaseId, workdir)) {
                if (matchers.stream().anyMatch(m -> m.matches(Path.of(rel)))) {
                    client.download(leaseId, workdir + "/" + rel, local.resolve(rel));
                }
            }
            files.putAll(FilesService.outputFiles(runContext, globs));
        }
        Duration download = Duration.ofNanos(System.nanoTime() - t2);

        Result r = new Result(exit.getCode(), exit.getSignal(), exit.getTimedOut(), exit.getCancelled(), logs.getOutputs(), files,
            logs.getStdOutCount(), logs.getStdErrCount(), upload, exec, download);
        if (exit.getCode() != 0 && runContext.render(failOnNonZeroExit).as(Boolean.class).orElse(true)) {
            String why = exit.getTimedOut() ? " (timed out)" : exit.getCancelled() ? " (cancelled)" : exit.getSignal().isEmpty() ? "" : " (signal " + exit.getSignal() + ")";
            throw new IllegalStateException("the command exited with " + exit.getCode() + why);
        }
        return r;
    }

    /** Stops a running command: CancelExec, then (for Run) releases the lease. May run on another thread. */
    public void kill() {
        killed = true;
        Running r = running;
        if (r == null) {
            return;
        }
        r.client().cancelQuietly(r.leaseId(), r.execId());
        if (r.releaseOnKill()) {
            r.client().releaseQuietly(r.leaseId());
        }
    }
}
