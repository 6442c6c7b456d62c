package io.kestra.plugin.mpool;

import java.io.IOException;
import java.net.ServerSocket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.time.Duration;
import java.time.Instant;
import java.util.HexFormat;
import java.util.UUID;

/**
 * A real `mpool sim` (the Multipass simulator, time scale 0) and a real `mpool serve` as child
 * processes, started once per test JVM: gRPC on a Unix socket and on loopback TCP with a bearer
 * token, and the HTTP/JSON facade on loopback with the same token. The binary is $MPOOL_BIN
 * (Maven passes ../../target/debug/mpool; build it with `cargo build` first).
 *
 * The connection settings reach the flows as Kestra globals ({{ globals.mpoolgrpc }},
 * {{ globals.mpoolhttp }}, {{ globals.mpooltoken }}), set as system properties before the
 * Kestra test context starts.
 */
public final class MpoolStack {
    public static final String POOL = "ci";
    /** A one-VM pool for the task runner's tests: its VM's directory is known before a flow runs. */
    public static final String RUNNER_POOL = "runner";

    private static MpoolStack instance;

    public final Path dir;
    public final String token = "kestra-test-" + UUID.randomUUID();
    public final int grpcPort;
    public final int httpPort;
    /** An endpoint where no mpool listens (a free port, closed again): a host that is down. */
    public final String downEndpoint;
    /**
     * The home directory of the runner pool's only VM. The simulator's VMs are directories on its
     * host: an absolute path inside a VM's directory is the same file for exec and for SFTP (Upload,
     * Download), while other absolute paths are the host's, which SFTP refuses. The task runner's
     * working directory must be reachable by both, so its tests put it under this directory (on a
     * real VM the default under /tmp works).
     */
    public final String runnerHome;
    private final Process sim;
    private final Process serve;
    private final HttpClient http = HttpClient.newHttpClient();

    /** The shared stack, started on first use. */
    public static synchronized MpoolStack get() {
        if (instance == null) {
            try {
                instance = new MpoolStack();
            } catch (Exception e) {
                throw new IllegalStateException("starting mpool sim + serve: " + e.getMessage(), e);
            }
            Runtime.getRuntime().addShutdownHook(new Thread(instance::stop));
            System.setProperty("kestra.variables.globals.mpoolgrpc", instance.grpcEndpoint());
            System.setProperty("kestra.variables.globals.mpoolhttp", instance.httpEndpoint());
            System.setProperty("kestra.variables.globals.mpooltoken", instance.token);
            System.setProperty("kestra.variables.globals.mpoolpool", POOL);
            System.setProperty("kestra.variables.globals.mpooldir", instance.dir.toString());
            System.setProperty("kestra.variables.globals.mpoolunix", instance.unixEndpoint());
            System.setProperty("kestra.variables.globals.mpooldown", instance.downEndpoint);
            System.setProperty("kestra.variables.globals.mpoolrunnerpool", RUNNER_POOL);
            System.setProperty("kestra.variables.globals.mpoolrunnerbase", instance.runnerHome + "/kestra-mpool");
        }
        return instance;
    }

    private MpoolStack() throws Exception {
        String bin = System.getenv().getOrDefault("MPOOL_BIN", "../../target/debug/mpool");
        if (!Files.isExecutable(Path.of(bin))) {
            throw new IllegalStateException(bin + " is not an executable: run `cargo build` at the repository root first (or set MPOOL_BIN)");
        }
        dir = Files.createTempDirectory("mpool-kestra-");
        grpcPort = freePort();
        httpPort = freePort();
        downEndpoint = "http://127.0.0.1:" + freePort();
        String hash = HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(token.getBytes(StandardCharsets.UTF_8)));
        Files.writeString(dir.resolve("tokens.toml"), """
            [[tokens]]
            name = "kestra"
            sha256 = "%s"
            pools = ["*"]
            """.formatted(hash));
        Files.writeString(dir.resolve("mpool.toml"), """
            [daemon]
            address = "unix:%1$s/multipass.sock"
            data_dir = "%1$s/data"
            call_timeout = "10s"
            blocking_call_timeout = "20s"

            [api]
            listen = ["unix:%1$s/mpool.sock", "127.0.0.1:%2$d"]
            tokens_file = "%1$s/tokens.toml"
            http_listen = "127.0.0.1:%3$d"

            [store]
            path = "%1$s/mpool.redb"

            [engine]
            reconcile_interval = "100ms"
            health_interval = "1s"
            shutdown_grace = "2s"

            [[pools]]
            name = "%4$s"
            min_ready = 2
            max_size = 4

            [[pools]]
            name = "%5$s"
            min_ready = 1
            max_size = 1
            """.formatted(dir, grpcPort, httpPort, POOL, RUNNER_POOL));
        sim = new ProcessBuilder(bin, "sim", "--socket", dir.resolve("multipass.sock").toString(),
            "--state-dir", dir.resolve("sim").toString(), "--time-scale", "0")
            .redirectErrorStream(true)
            .redirectOutput(dir.resolve("sim.log").toFile())
            .start();
        waitFor("the simulator's socket", () -> Files.exists(dir.resolve("multipass.sock")), sim);
        ProcessBuilder pb = new ProcessBuilder(bin, "serve", "--config", dir.resolve("mpool.toml").toString())
            .redirectErrorStream(true)
            .redirectOutput(dir.resolve("serve.log").toFile());
        pb.environment().put("MPOOL_LOG", "info,mpool=debug");
        serve = pb.start();
        waitFor("2 idle VMs in pool " + POOL, () -> idle() >= 2, serve);
        waitFor("an idle VM in pool " + RUNNER_POOL, () -> idle(RUNNER_POOL) >= 1, serve);
        String vm = null;
        for (var v : new com.fasterxml.jackson.databind.ObjectMapper().readTree(get("/v1/vms")).path("vms")) {
            if (RUNNER_POOL.equals(v.path("pool").asText())) {
                vm = v.path("name").asText();
            }
        }
        if (vm == null) {
            throw new IllegalStateException("no VM in pool " + RUNNER_POOL + "; logs:\n" + logs());
        }
        // The simulator keeps a VM where multipassd does, under <state>/vault/instances/NAME; its file
        // system (home) is `root` there.
        runnerHome = dir.resolve("sim").resolve("vault").resolve("instances").resolve(vm).resolve("root").toRealPath().toString();
    }

    private static int freePort() throws IOException {
        try (ServerSocket s = new ServerSocket(0)) {
            return s.getLocalPort();
        }
    }

    interface Check {
        boolean ok() throws Exception;
    }

    /** Polls `check` until it holds (60 s at most), failing early if `process` exits. */
    private void waitFor(String what, Check check, Process process) throws Exception {
        Instant deadline = Instant.now().plusSeconds(60);
        while (true) {
            try {
                if (check.ok()) {
                    return;
                }
            } catch (IOException ignored) {
                // not listening yet
            }
            if (!process.isAlive()) {
                throw new IllegalStateException("process exited with " + process.exitValue() + " while waiting for " + what + "; logs:\n" + logs());
            }
            if (Instant.now().isAfter(deadline)) {
                throw new IllegalStateException("timed out waiting for " + what + "; logs:\n" + logs());
            }
            Thread.sleep(50);
        }
    }

    /** Polls `check` until it holds, for tests (30 s at most). */
    public static void eventually(String what, Check check) throws Exception {
        Instant deadline = Instant.now().plusSeconds(30);
        while (!check.ok()) {
            if (Instant.now().isAfter(deadline)) {
                throw new AssertionError("timed out waiting for " + what);
            }
            Thread.sleep(50);
        }
    }

    public String grpcEndpoint() {
        return "http://127.0.0.1:" + grpcPort;
    }

    public String httpEndpoint() {
        return "http://127.0.0.1:" + httpPort;
    }

    public String unixEndpoint() {
        return "unix:" + dir.resolve("mpool.sock");
    }

    /** GET on the HTTP/JSON facade with the token; the body as text. */
    public String get(String path) throws IOException, InterruptedException {
        HttpRequest req = HttpRequest.newBuilder(URI.create(httpEndpoint() + path))
            .header("Authorization", "Bearer " + token)
            .timeout(Duration.ofSeconds(10))
            .GET().build();
        HttpResponse<String> r = http.send(req, HttpResponse.BodyHandlers.ofString());
        if (r.statusCode() != 200) {
            throw new IOException("GET " + path + ": " + r.statusCode() + " " + r.body());
        }
        return r.body();
    }

    /** Idle (hot + warm) VMs of the pool, from the facade's pool JSON. */
    public int idle() throws IOException, InterruptedException {
        return idle(POOL);
    }

    /** Idle (hot + warm) VMs of `pool`. */
    public int idle(String pool) throws IOException, InterruptedException {
        String body = get("/v1/pools/" + pool);
        return count(body, "\"hot\":") + count(body, "\"warm\":");
    }

    private static int count(String json, String key) {
        int i = json.indexOf(key);
        if (i < 0) {
            return 0;
        }
        int j = i + key.length();
        int k = j;
        while (k < json.length() && Character.isDigit(json.charAt(k))) {
            k++;
        }
        return k > j ? Integer.parseInt(json.substring(j, k)) : 0;
    }

    /** The leases mpool holds now (JSON). */
    public String leases() throws IOException, InterruptedException {
        return get("/v1/leases");
    }

    public String logs() {
        StringBuilder b = new StringBuilder();
        for (String f : new String[]{"sim.log", "serve.log"}) {
            try {
                b.append("--- ").append(f).append('\n').append(Files.readString(dir.resolve(f)));
            } catch (IOException e) {
                b.append("--- ").append(f).append(": ").append(e.getMessage()).append('\n');
            }
        }
        return b.toString();
    }

    private void stop() {
        for (Process p : new Process[]{serve, sim}) {
            if (p != null && p.isAlive()) {
                p.destroy();
                try {
                    if (!p.waitFor(5, java.util.concurrent.TimeUnit.SECONDS)) {
                        p.destroyForcibly();
                    }
                } catch (InterruptedException e) {
                    p.destroyForcibly();
                }
            }
        }
        // The stack's directory (sockets, store, simulated VMs) goes with it.
        try (var paths = Files.walk(dir)) {
            paths.sorted(java.util.Comparator.reverseOrder()).forEach(f -> f.toFile().delete());
        } catch (IOException ignored) {
            // best effort at JVM exit
        }
    }
}
