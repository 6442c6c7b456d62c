package io.kestra.plugin.mpool;

import ch.qos.logback.classic.Level;
import ch.qos.logback.classic.Logger;
import ch.qos.logback.classic.spi.ILoggingEvent;
import ch.qos.logback.core.read.ListAppender;
import io.kestra.core.junit.annotations.KestraTest;
import io.kestra.core.models.property.Property;
import io.kestra.core.runners.RunContext;
import io.kestra.core.runners.DefaultRunContext;
import io.kestra.core.runners.RunContextFactory;
import io.kestra.core.runners.RunContextInitializer;
import io.kestra.plugin.mpool.fixtures.ShellCommands;
import io.kestra.plugin.scripts.exec.scripts.models.ScriptOutput;
import jakarta.inject.Inject;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;
import org.slf4j.LoggerFactory;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.Callable;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

import static io.kestra.core.tenant.TenantService.MAIN_TENANT;
import static org.hamcrest.MatcherAssert.assertThat;
import static org.hamcrest.Matchers.*;
import static org.junit.jupiter.api.Assertions.assertThrows;

/**
 * A task whose worker-side connection to mpool is cut mid-command (a {@link CuttableProxy}
 * between the task and `mpool serve`: the worker died or lost the network), then run again as
 * Kestra runs it again: a re-submission of the same task run, with one attempt more (what
 * {@code TaskRun.onRunningResend()} does), or the same attempt again. The command runs on in the
 * VM, the new attempt follows it (its output replayed, then live), and it runs once.
 */
@ExtendWith(MpoolStackExtension.class)
@KestraTest
class ResumeTest {
    @Inject
    RunContextFactory runContextFactory;

    @Inject
    RunContextInitializer runContextInitializer;

    /** The logger of the test run contexts (runContextFactory.of(Map)). */
    private static final String TASK_LOGGER = "unit-test";

    private final ExecutorService threads = Executors.newVirtualThreadPerTaskExecutor();

    private RunContext context(String taskRunId, int attemptsCount) {
        return runContextFactory.of(Map.of(
            "taskrun", Map.of("id", taskRunId, "attemptsCount", attemptsCount),
            "flow", Map.of("namespace", "io.kestra.plugin.mpool.tests", "id", "resume", "tenantId", MAIN_TENANT),
            "execution", Map.of("id", "exec-" + taskRunId),
            "task", Map.of("id", "step")));
    }

    /**
     * The command: counts its runs in a file on the simulator's host (a simulated VM's commands
     * run there), prints an output, says it started, waits for the test's go, then prints another
     * output, writes a result file and exits 7 (or {@code exit}).
     */
    private static List<String> command(Path dir, String name) {
        return command(dir, name, 7);
    }

    private static List<String> command(Path dir, String name, int exit) {
        String f = dir.resolve(name).toString();
        return List.of(
            "echo ran >> '" + f + ".count'",
            "echo $$ > '" + f + ".pid'",
            "echo '::{\"outputs\":{\"before\":\"the cut\"}}::'",
            "echo written-before-the-cut",
            "touch '" + f + ".started'",
            "while [ ! -e '" + f + ".go' ]; do sleep 0.1; done",
            "echo resumed > result.txt",
            "echo '::{\"outputs\":{\"after\":\"the cut\"}}::'",
            "exit " + exit);
    }

    /** A run context with its services, as a worker gives (script tasks need them). */
    private RunContext initialized(String taskRunId, int attemptsCount) {
        return runContextInitializer.forExecutor((DefaultRunContext) context(taskRunId, attemptsCount));
    }

    /**
     * What the tasks log from now on (their run contexts' logger, at INFO); the previous appender
     * is removed.
     */
    private ListAppender<ILoggingEvent> taskLog() {
        Logger logger = (Logger) LoggerFactory.getLogger(TASK_LOGGER);
        logger.setLevel(Level.INFO);
        logger.detachAndStopAllAppenders();
        ListAppender<ILoggingEvent> logged = new ListAppender<>();
        logged.start();
        logger.addAppender(logged);
        return logged;
    }

    private <T> Future<T> async(Callable<T> call) {
        return threads.submit(call);
    }

    /** Waits for the command to start, cuts the connection, and checks the attempt failed for that. */
    private static void cutMidCommand(CuttableProxy proxy, Path started, Future<?> attempt) throws Exception {
        MpoolStack.eventually("the command started", () -> {
            if (attempt.isDone()) {
                attempt.get();
                throw new AssertionError("the attempt ended before the cut");
            }
            return Files.exists(started);
        });
        proxy.cut();
        ExecutionException e = assertThrows(ExecutionException.class, () -> attempt.get(60, TimeUnit.SECONDS));
        assertThat(String.valueOf(e.getCause()), MpoolClient.connectionLost(e.getCause()), is(true));
        proxy.restore();
    }

    private Run run(CuttableProxy proxy, Path dir, String name) {
        MpoolStack stack = MpoolStack.get();
        return Run.builder()
            .id("step").type(Run.class.getName())
            .endpoint(Property.ofValue(proxy.endpoint()))
            .token(Property.ofValue(stack.token))
            .pool(Property.ofValue(MpoolStack.POOL))
            .commands(Property.ofValue(command(dir, name)))
            .outputFiles(Property.ofValue(List.of("result.txt")))
            .failOnNonZeroExit(Property.ofValue(false))
            .build();
    }

    @Test
    void aRunCutMidCommandIsFollowedByItsResubmissionAndRunsOnce() throws Exception {
        MpoolStack stack = MpoolStack.get();
        String taskRun = "tr-run-" + UUID.randomUUID();
        Path dir = stack.dir;
        try (CuttableProxy proxy = new CuttableProxy(stack.grpcPort)) {
            Run task = run(proxy, dir, taskRun);
            Future<Run.Output> first = async(() -> task.run(context(taskRun, 0)));
            cutMidCommand(proxy, dir.resolve(taskRun + ".started"), first);

            // Kestra re-submits the task run with one attempt more; the command still waits.
            ListAppender<ILoggingEvent> logged = taskLog();
            Future<Run.Output> resubmitted = async(() -> task.run(context(taskRun, 1)));
            Files.writeString(dir.resolve(taskRun + ".go"), "");
            Run.Output out = resubmitted.get(2, TimeUnit.MINUTES);

            // The output from before the cut is in the log once, after the replay's marker.
            List<String> log = logged.list.stream().map(ILoggingEvent::getFormattedMessage).toList();
            assertThat(log, hasItem(containsString("written-before-the-cut")));
            assertThat(log.stream().filter(l -> l.contains("written-before-the-cut")).count(), is(1L));
            assertThat(log.stream().filter(l -> l.startsWith("Replaying the output")).count(), is(1L));
            assertThat(log.indexOf(log.stream().filter(l -> l.startsWith("Replaying the output")).findFirst().orElseThrow()),
                lessThan(log.indexOf("written-before-the-cut")));

            assertThat(out.getExitCode(), is(7));
            assertThat(out.getServed(), is("SERVED_REPEAT"));
            assertThat(out.getVars(), allOf(hasEntry("before", "the cut"), hasEntry("after", "the cut")));
            assertThat(out.getOutputFiles().keySet(), contains("result.txt"));
            assertThat("the command ran once", Files.readAllLines(dir.resolve(taskRun + ".count")), contains("ran"));
            String lease = out.getLeaseId();
            MpoolStack.eventually("lease " + lease + " released", () -> !stack.leases().contains(lease));
        }
    }

    @Test
    void anExecCutMidCommandIsFollowedWhenTheSameAttemptRunsAgain() throws Exception {
        MpoolStack stack = MpoolStack.get();
        String taskRun = "tr-exec-" + UUID.randomUUID();
        Path dir = stack.dir;
        Acquire.Output vm = Acquire.builder()
            .id("vm").type(Acquire.class.getName())
            .endpoint(Property.ofValue(stack.grpcEndpoint()))
            .token(Property.ofValue(stack.token))
            .pool(Property.ofValue(MpoolStack.POOL))
            .build()
            .run(context("tr-vm-" + UUID.randomUUID(), 0));
        try (CuttableProxy proxy = new CuttableProxy(stack.grpcPort)) {
            Exec task = Exec.builder()
                .id("step").type(Exec.class.getName())
                .endpoint(Property.ofValue(proxy.endpoint()))
                .token(Property.ofValue(stack.token))
                .leaseId(Property.ofValue(vm.getLeaseId()))
                .commands(Property.ofValue(command(dir, taskRun)))
                .failOnNonZeroExit(Property.ofValue(false))
                .build();
            Future<Exec.Output> first = async(() -> task.run(context(taskRun, 0)));
            cutMidCommand(proxy, dir.resolve(taskRun + ".started"), first);

            // The same attempt again: its Exec finds the session (ALREADY_EXISTS) and attaches.
            Future<Exec.Output> again = async(() -> task.run(context(taskRun, 0)));
            Files.writeString(dir.resolve(taskRun + ".go"), "");
            Exec.Output out = again.get(2, TimeUnit.MINUTES);

            assertThat(out.getExitCode(), is(7));
            assertThat(out.getVars(), allOf(hasEntry("before", "the cut"), hasEntry("after", "the cut")));
            assertThat("the command ran once", Files.readAllLines(dir.resolve(taskRun + ".count")), contains("ran"));
        } finally {
            Release.builder()
                .id("release").type(Release.class.getName())
                .endpoint(Property.ofValue(stack.grpcEndpoint()))
                .token(Property.ofValue(stack.token))
                .leaseId(Property.ofValue(vm.getLeaseId()))
                .build()
                .run(context("tr-release-" + UUID.randomUUID(), 0));
        }
    }

    @Test
    void aScriptTaskOnTheRunnerCutMidCommandIsFollowedByItsResubmission() throws Exception {
        MpoolStack stack = MpoolStack.get();
        String taskRun = "tr-runner-" + UUID.randomUUID();
        Path dir = stack.dir;
        try (CuttableProxy proxy = new CuttableProxy(stack.grpcPort)) {
            ShellCommands task = ShellCommands.builder()
                .id("shell").type(ShellCommands.class.getName())
                .taskRunner(io.kestra.plugin.mpool.runner.Mpool.builder()
                    .type(io.kestra.plugin.mpool.runner.Mpool.class.getName())
                    .endpoint(Property.ofValue(proxy.endpoint()))
                    .token(Property.ofValue(stack.token))
                    .pool(Property.ofValue(MpoolStack.RUNNER_POOL))
                    .remoteBaseDir(Property.ofValue(stack.runnerHome + "/kestra-mpool"))
                    .build())
                .commands(Property.ofValue(command(dir, taskRun, 0)))
                .build();
            Future<ScriptOutput> first = async(() -> task.run(initialized(taskRun, 0)));
            cutMidCommand(proxy, dir.resolve(taskRun + ".started"), first);

            Future<ScriptOutput> resubmitted = async(() -> task.run(initialized(taskRun, 1)));
            Files.writeString(dir.resolve(taskRun + ".go"), "");
            ScriptOutput out = resubmitted.get(2, TimeUnit.MINUTES);

            assertThat(out.getExitCode(), is(0));
            assertThat(out.getVars(), allOf(hasEntry("before", "the cut"), hasEntry("after", "the cut")));
            assertThat("the command ran once", Files.readAllLines(dir.resolve(taskRun + ".count")), contains("ran"));
            MpoolStack.eventually("the runner's lease released", () -> !stack.leases().contains(taskRun));
        }
    }

    /**
     * An open attempt whose lease has ended meanwhile (released, or expired): its re-submission
     * has nothing to follow (mpool answers FAILED_PRECONDITION for the ended request) and runs
     * the command afresh as a new attempt, on a new lease.
     */
    @Test
    void aResubmissionWhoseEarlierLeaseEndedStartsAfresh() throws Exception {
        MpoolStack stack = MpoolStack.get();
        String taskRun = "tr-ended-" + UUID.randomUUID();
        Path count = stack.dir.resolve(taskRun + ".count");
        Acquire.Output earlier = Acquire.builder()
            .id("step").type(Acquire.class.getName())
            .endpoint(Property.ofValue(stack.grpcEndpoint()))
            .token(Property.ofValue(stack.token))
            .pool(Property.ofValue(MpoolStack.POOL))
            .build()
            .run(context(taskRun, 0));
        Release.builder()
            .id("release").type(Release.class.getName())
            .endpoint(Property.ofValue(stack.grpcEndpoint()))
            .token(Property.ofValue(stack.token))
            .leaseId(Property.ofValue(earlier.getLeaseId()))
            .build()
            .run(context(taskRun, 0));
        // Attempt 0 stays open, as a worker that died leaves it.
        assertThat(Attempt.of(context(taskRun, 0)), is(new Attempt(taskRun, 0, false)));

        Run.Output out = Run.builder()
            .id("step").type(Run.class.getName())
            .endpoint(Property.ofValue(stack.grpcEndpoint()))
            .token(Property.ofValue(stack.token))
            .pool(Property.ofValue(MpoolStack.POOL))
            .commands(Property.ofValue(List.of("echo ran >> '" + count + "'")))
            .build()
            .run(context(taskRun, 1));

        assertThat(out.getExitCode(), is(0));
        assertThat(out.getLeaseId(), not(earlier.getLeaseId()));
        assertThat(Files.readAllLines(count), contains("ran"));
        assertThat("the attempt ended", Attempt.of(context(taskRun, 2)), is(new Attempt(taskRun, 2, false)));
        Attempt.close(context(taskRun, 2));
    }

    @Test
    void killingTheResubmittedRunStopsTheEarlierAttemptsCommand() throws Exception {
        MpoolStack stack = MpoolStack.get();
        String taskRun = "tr-kill-" + UUID.randomUUID();
        Path dir = stack.dir;
        try (CuttableProxy proxy = new CuttableProxy(stack.grpcPort)) {
            Run task = run(proxy, dir, taskRun);
            Future<Run.Output> first = async(() -> task.run(context(taskRun, 0)));
            cutMidCommand(proxy, dir.resolve(taskRun + ".started"), first);
            long pid = Long.parseLong(Files.readString(dir.resolve(taskRun + ".pid")).trim());
            assertThat("the command runs on after the cut", ProcessHandle.of(pid).map(ProcessHandle::isAlive).orElse(false), is(true));

            Run again = run(proxy, dir, taskRun);
            Future<Run.Output> resubmitted = async(() -> again.run(context(taskRun, 1)));
            again.kill();
            ExecutionException e = assertThrows(ExecutionException.class, () -> resubmitted.get(2, TimeUnit.MINUTES));
            assertThat(String.valueOf(e.getCause()), MpoolClient.connectionLost(e.getCause()), is(false));
            MpoolStack.eventually("the remote command stopped", () -> ProcessHandle.of(pid).map(p -> !p.isAlive()).orElse(true));
            assertThat("never got its go", Files.exists(dir.resolve(taskRun + ".go")), is(false));
            assertThat(Files.readAllLines(dir.resolve(taskRun + ".count")), contains("ran"));
            MpoolStack.eventually("the lease released", () -> !stack.leases().contains(taskRun));
        }
    }
}
