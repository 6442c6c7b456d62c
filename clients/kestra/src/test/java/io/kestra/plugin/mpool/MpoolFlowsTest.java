package io.kestra.plugin.mpool;

import io.kestra.core.junit.annotations.KestraTest;
import io.kestra.core.junit.annotations.LoadFlows;
import io.kestra.core.models.executions.Execution;
import io.kestra.core.models.executions.TaskRun;
import io.kestra.core.models.flows.State;
import io.kestra.core.runners.TestRunnerUtils;
import io.kestra.core.storages.StorageInterface;
import jakarta.inject.Inject;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

import java.io.InputStream;
import java.io.OutputStream;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Map;

import static io.kestra.core.tenant.TenantService.MAIN_TENANT;
import static org.hamcrest.MatcherAssert.assertThat;
import static org.hamcrest.Matchers.*;

/**
 * Real flows on Kestra's in-memory runner against a real `mpool serve` + `mpool sim`.
 */
@ExtendWith(MpoolStackExtension.class)
@KestraTest(startRunner = true)
class MpoolFlowsTest {
    static final String NS = "io.kestra.plugin.mpool.tests";

    static {
        MpoolStack.get();
    }

    @Inject
    TestRunnerUtils runnerUtils;

    @Inject
    StorageInterface storage;

    private String read(URI uri) throws Exception {
        try (InputStream in = storage.get(MAIN_TENANT, NS, uri)) {
            return new String(in.readAllBytes(), StandardCharsets.UTF_8);
        }
    }

    private static TaskRun task(Execution e, String id) {
        return e.findTaskRunsByTaskId(id).getFirst();
    }

    private static String explain(Execution e) {
        return e.getState().getCurrent() + " " + e.getTaskRunList().stream()
            .map(t -> t.getTaskId() + "=" + t.getState().getCurrent() + " " + t.getOutputs())
            .toList() + "\n" + MpoolStack.get().logs();
    }

    @SuppressWarnings("unchecked")
    @Test
    @LoadFlows("flows/run.yaml")
    void runWithInputAndOutputFilesAndOutputs() throws Exception {
        Execution e = runnerUtils.runOne(MAIN_TENANT, NS, "run", Duration.ofMinutes(2));
        assertThat(explain(e), e.getState().getCurrent(), is(State.Type.SUCCESS));
        Map<String, Object> out = task(e, "build").getOutputs();
        assertThat(out.get("exitCode"), is(0));
        Map<String, Object> vars = (Map<String, Object>) out.get("vars");
        assertThat(vars.get("lines"), is(3));
        assertThat(vars.get("greeting"), is("hello"));
        Map<String, Object> files = (Map<String, Object>) out.get("outputFiles");
        assertThat(files.keySet(), containsInAnyOrder("count.txt", "reports/summary.txt"));
        assertThat(read(URI.create(files.get("count.txt").toString())).trim(), is("3"));
        assertThat(read(URI.create(files.get("reports/summary.txt").toString())), is("report: hello\n"));
        assertThat((String) out.get("vm"), startsWith("mpool-"));
        assertThat(out.get("stdErrLineCount"), is(1));
        Map<String, Object> timings = (Map<String, Object>) out.get("timings");
        assertThat(timings.keySet(), hasItems("acquire", "upload", "exec", "download", "total"));
        // The lease was released.
        String lease = (String) out.get("leaseId");
        MpoolStack.eventually("lease " + lease + " released", () -> !MpoolStack.get().leases().contains(lease));
    }

    @SuppressWarnings("unchecked")
    @Test
    @LoadFlows("flows/lease.yaml")
    void acquireTwoExecsRelease() throws Exception {
        Execution e = runnerUtils.runOne(MAIN_TENANT, NS, "lease", Duration.ofMinutes(2));
        assertThat(explain(e), e.getState().getCurrent(), is(State.Type.SUCCESS));
        String lease = (String) task(e, "vm").getOutputs().get("leaseId");
        assertThat(lease, not(emptyOrNullString()));
        assertThat(task(e, "vm").getOutputs().get("served"), is(in(new String[]{"SERVED_HOT", "SERVED_WARM", "SERVED_COLD"})));
        Map<String, Object> read = task(e, "read").getOutputs();
        assertThat(((Map<String, Object>) read.get("vars")).get("state"), is("state from step one"));
        Map<String, Object> files = (Map<String, Object>) read.get("outputFiles");
        assertThat(read(URI.create(files.get("state.txt").toString())), is("state from step one\n"));
        assertThat(task(e, "release").getState().getCurrent(), is(State.Type.SUCCESS));
        assertThat(MpoolStack.get().leases(), not(containsString(lease)));
    }

    @SuppressWarnings("unchecked")
    @Test
    @LoadFlows("flows/fleet.yaml")
    void twoEndpointsOneOfThemDown() throws Exception {
        Execution e = runnerUtils.runOne(MAIN_TENANT, NS, "fleet", Duration.ofMinutes(2));
        assertThat(explain(e), e.getState().getCurrent(), is(State.Type.SUCCESS));
        String up = MpoolStack.get().grpcEndpoint();
        Map<String, Object> vm = task(e, "vm").getOutputs();
        // The lease names its host (a handle: URL-safe, no '/'), the one that answered.
        String handle = (String) vm.get("leaseId");
        assertThat(vm.get("endpoint"), is(up));
        assertThat(handle, allOf(containsString("@"), not(containsString("/"))));
        assertThat(LeaseHandle.decode(handle).endpoint(), is(up));
        assertThat(((Map<String, Object>) task(e, "step").getOutputs().get("vars")).get("step"), is("on the host that answered"));
        Map<String, Object> oneshot = task(e, "oneshot").getOutputs();
        assertThat(oneshot.get("endpoint"), is(up));
        assertThat(((Map<String, Object>) oneshot.get("vars")).get("ran"), is("yes"));
        assertThat(task(e, "release").getState().getCurrent(), is(State.Type.SUCCESS));
        String id = LeaseHandle.decode(handle).leaseId();
        MpoolStack.eventually("lease " + id + " released", () -> !MpoolStack.get().leases().contains(id));
    }

    @SuppressWarnings("unchecked")
    @Test
    @LoadFlows("flows/runner.yaml")
    void scriptTaskWithTheMpoolTaskRunner() throws Exception {
        Execution e = runnerUtils.runOne(MAIN_TENANT, NS, "runner", Duration.ofMinutes(2));
        assertThat(explain(e), e.getState().getCurrent(), is(State.Type.SUCCESS));
        Map<String, Object> out = task(e, "shell").getOutputs();
        assertThat(out.get("exitCode"), is(0));
        Map<String, Object> vars = (Map<String, Object>) out.get("vars");
        assertThat((String) vars.get("pwd"), startsWith(MpoolStack.get().runnerHome + "/kestra-mpool/"));
        assertThat(vars.get("workingDir"), is(vars.get("pwd")));
        Map<String, Object> files = (Map<String, Object>) out.get("outputFiles");
        assertThat(read(URI.create(files.get("out.txt").toString())), is("from kestra and back\n"));
        assertThat(read(URI.create(files.get("where.txt").toString())), is("ran in " + vars.get("pwd") + "\n"));
        MpoolStack.eventually("no lease left by " + e.getId(), () -> !MpoolStack.get().leases().contains(e.getId()));
    }

    @SuppressWarnings("unchecked")
    @Test
    @LoadFlows("flows/big.yaml")
    void a64MiBFileThroughRunAndTheTaskRunner() throws Exception {
        Execution e = runnerUtils.runOne(MAIN_TENANT, NS, "big", Duration.ofMinutes(5));
        assertThat(explain(e), e.getState().getCurrent(), is(State.Type.SUCCESS));
        long size = 64L << 20;
        // Made in one VM, brought back into Kestra's storage (Download in chunks).
        Map<String, Object> make = task(e, "make").getOutputs();
        String sum = (String) ((Map<String, Object>) make.get("vars")).get("sum");
        assertThat(sum, matchesPattern("[0-9a-f]{64}"));
        URI made = URI.create(((Map<String, Object>) make.get("outputFiles")).get("big.bin").toString());
        try (InputStream in = storage.get(MAIN_TENANT, NS, made)) {
            assertThat(in.transferTo(OutputStream.nullOutputStream()), is(size));
        }
        // Sent into a second VM by the Run task (Upload in chunks): same checksum there.
        assertThat(((Map<String, Object>) task(e, "check").getOutputs().get("vars")).get("sum"), is(sum));
        // And through the task runner, both ways.
        Map<String, Object> runner = task(e, "runner").getOutputs();
        assertThat(((Map<String, Object>) runner.get("vars")).get("sum"), is(sum));
        URI copy = URI.create(((Map<String, Object>) runner.get("outputFiles")).get("copy.bin").toString());
        try (InputStream in = storage.get(MAIN_TENANT, NS, copy)) {
            assertThat(in.transferTo(OutputStream.nullOutputStream()), is(size));
        }
    }

    @Test
    @LoadFlows("flows/http.yaml")
    void onlyTheCoreHttpRequestTask() throws Exception {
        Execution e = runnerUtils.runOne(MAIN_TENANT, NS, "http", Duration.ofMinutes(2));
        assertThat(explain(e), e.getState().getCurrent(), is(State.Type.SUCCESS));
        assertThat(task(e, "run").getOutputs().get("code"), is(200));
        assertThat(task(e, "exit_code").getOutputs().get("value"), is("3"));
        assertThat(task(e, "stdout").getOutputs().get("value"), is("hello from the pool"));
    }

    @Test
    @LoadFlows("flows/killed.yaml")
    void killingAnExecutionStopsTheCommandAndReleasesTheLease() throws Exception {
        killAndCheck("killed", "kill-");
    }

    @Test
    @LoadFlows("flows/runner_killed.yaml")
    void killingAScriptTaskOnTheRunnerStopsTheCommandAndReleasesTheLease() throws Exception {
        killAndCheck("runner_killed", "runner-");
    }

    @SuppressWarnings("unchecked")
    @Test
    @LoadFlows("flows/unix.yaml")
    void runOverTheUnixSocket() throws Exception {
        Execution e = runnerUtils.runOne(MAIN_TENANT, NS, "unix", Duration.ofMinutes(2));
        assertThat(explain(e), e.getState().getCurrent(), is(State.Type.SUCCESS));
        Map<String, Object> vars = (Map<String, Object>) task(e, "hello").getOutputs().get("vars");
        assertThat((String) vars.get("user"), not(emptyOrNullString()));
    }

    private void killAndCheck(String flowId, String pidPrefix) throws Exception {
        Execution running = runnerUtils.runOneUntilRunning(MAIN_TENANT, NS, flowId);
        Path pidFile = MpoolStack.get().dir.resolve(pidPrefix + running.getId() + ".pid");
        MpoolStack.eventually("the remote command started", () -> Files.exists(pidFile) && Files.size(pidFile) > 0);
        long pid = Long.parseLong(Files.readString(pidFile).trim());
        assertThat(ProcessHandle.of(pid).map(ProcessHandle::isAlive).orElse(false), is(true));
        assertThat(MpoolStack.get().leases(), containsString(running.getId()));

        runnerUtils.killExecution(running);
        Execution killed = runnerUtils.awaitExecution(
            ex -> ex.getId().equals(running.getId()) && ex.getState().isTerminated(), running, Duration.ofMinutes(1));
        assertThat(explain(killed), killed.getState().getCurrent(), is(State.Type.KILLED));
        MpoolStack.eventually("the remote command stopped", () -> ProcessHandle.of(pid).map(p -> !p.isAlive()).orElse(true));
        MpoolStack.eventually("the lease released", () -> !MpoolStack.get().leases().contains(running.getId()));
    }
}
