package io.kestra.plugin.mpool;

import com.google.protobuf.ByteString;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ForwardingClientCall;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.shaded.io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.shaded.io.netty.channel.epoll.EpollDomainSocketChannel;
import io.grpc.netty.shaded.io.netty.channel.epoll.EpollEventLoopGroup;
import io.grpc.netty.shaded.io.netty.channel.unix.DomainSocketAddress;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import io.grpc.stub.StreamObserver;
import mpool.v1.PoolGrpc;
import mpool.v1.PoolOuterClass.*;

import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.PosixFilePermission;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Set;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import java.util.function.BiConsumer;

/**
 * A connection to mpool's gRPC API ({@code mpool.v1.Pool}) and the few composite operations the
 * tasks and the task runner share: exec with line-by-line output, sessions (a command kept running
 * in the VM if this caller goes away, attached to again with its output replayed), uploads and downloads of files
 * (Upload and Download, streamed in chunks: any size up to the server's max_upload/max_download,
 * to any path the VM's SSH user may write), listing remote files, and quiet cancel/release for kill().
 */
public final class MpoolClient implements AutoCloseable {
    private final ManagedChannel channel;
    private final EpollEventLoopGroup group;
    private final PoolGrpc.PoolBlockingStub blocking;
    private final PoolGrpc.PoolStub async;

    private MpoolClient(ManagedChannel channel, EpollEventLoopGroup group) {
        this.channel = channel;
        this.group = group;
        this.blocking = PoolGrpc.newBlockingStub(channel);
        this.async = PoolGrpc.newStub(channel);
    }

    /**
     * Connects to {@code endpoint}: {@code unix:/path/to/mpool.sock}, {@code http://host:port}
     * (plaintext, e.g. loopback with a token) or {@code https://host:port} (TLS; {@code caPem}
     * is the CA certificate in PEM, or null for the system trust store).
     */
    public static MpoolClient connect(String endpoint, String token, String caPem) throws IOException {
        if (endpoint == null || endpoint.isBlank()) {
            throw new IllegalArgumentException("endpoint is required: unix:/run/mpool/mpool.sock, http://127.0.0.1:7070 or https://host:7070");
        }
        NettyChannelBuilder builder;
        EpollEventLoopGroup group = null;
        if (endpoint.startsWith("unix:")) {
            String path = endpoint.substring("unix:".length());
            group = new EpollEventLoopGroup(1);
            builder = NettyChannelBuilder.forAddress(new DomainSocketAddress(path))
                .eventLoopGroup(group)
                .channelType(EpollDomainSocketChannel.class)
                // The default authority would be the socket path, which is no valid HTTP/2 :authority.
                .overrideAuthority("localhost")
                .usePlaintext();
        } else {
            URI uri = URI.create(endpoint);
            String scheme = uri.getScheme() == null ? "" : uri.getScheme();
            if (uri.getHost() == null || uri.getPort() < 0) {
                throw new IllegalArgumentException("endpoint " + endpoint + ": write unix:PATH, http://HOST:PORT or https://HOST:PORT");
            }
            builder = NettyChannelBuilder.forAddress(uri.getHost(), uri.getPort());
            switch (scheme) {
                case "http" -> builder.usePlaintext();
                case "https" -> {
                    var ssl = GrpcSslContexts.forClient();
                    if (caPem != null && !caPem.isBlank()) {
                        ssl.trustManager(new ByteArrayInputStream(caPem.getBytes(StandardCharsets.UTF_8)));
                    }
                    builder.sslContext(ssl.build());
                }
                default -> throw new IllegalArgumentException("endpoint " + endpoint + ": the scheme must be unix:, http:// or https://");
            }
        }
        builder.maxInboundMessageSize(64 << 20);
        if (token != null && !token.isBlank()) {
            builder.intercept(bearer(token.trim()));
        }
        return new MpoolClient(builder.build(), group);
    }

    private static ClientInterceptor bearer(String token) {
        Metadata.Key<String> key = Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
        return new ClientInterceptor() {
            @Override
            public <Q, A> ClientCall<Q, A> interceptCall(MethodDescriptor<Q, A> method, CallOptions options, Channel next) {
                return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
                    @Override
                    public void start(Listener<A> listener, Metadata headers) {
                        headers.put(key, "Bearer " + token);
                        super.start(listener, headers);
                    }
                };
            }
        };
    }

    /** The blocking stub, for plain unary calls. */
    public PoolGrpc.PoolBlockingStub stub() {
        return blocking;
    }

    /** Acquires a lease. */
    public Lease acquire(AcquireRequest request) {
        return blocking.acquire(request);
    }

    /** Releases a lease; failures are returned, not thrown (for finally blocks and kill()). */
    public Exception releaseQuietly(String leaseId) {
        if (leaseId == null) {
            return null;
        }
        try {
            blocking.withDeadlineAfter(30, TimeUnit.SECONDS).release(ReleaseRequest.newBuilder().setLeaseId(leaseId).build());
            return null;
        } catch (Exception e) {
            return e;
        }
    }

    /** Cancels a running exec; failures are ignored (the lease's release stops it too). */
    public boolean cancelQuietly(String leaseId, String execId) {
        try {
            return blocking.withDeadlineAfter(30, TimeUnit.SECONDS)
                .cancelExec(CancelExecRequest.newBuilder().setLeaseId(leaseId).setExecId(execId).build())
                .getCancelled();
        } catch (Exception e) {
            return false;
        }
    }

    /**
     * Runs a command and feeds its output line by line to {@code lines} ({@code (line, isStdErr)}),
     * returning how it ended. CancelExec (another thread's kill()) ends it with {@code cancelled}.
     */
    public ExitStatus exec(String leaseId, String execId, Command command, BiConsumer<String, Boolean> lines) {
        ExecRequest request = ExecRequest.newBuilder().setLeaseId(leaseId).setExecId(execId).setCommand(command).build();
        // A plain exec's stream is a session's without replay or dropped bytes: one loop for both.
        return new Follower(lines, org.slf4j.LoggerFactory.getLogger(MpoolClient.class)).follow(blocking.exec(request));
    }

    /**
     * Starts {@code command} as session {@code session} of the lease (kept running in the VM if
     * this caller goes away: {@code on_disconnect = KEEP}) and follows it to its exit. When the
     * lease already has that session (ALREADY_EXISTS: an earlier attempt started it), attaches to
     * it instead: its output so far is replayed, then followed live, and the command runs once.
     */
    public ExitStatus startSession(String leaseId, String session, Command command, Follower follower) {
        ExecRequest request = ExecRequest.newBuilder()
            .setLeaseId(leaseId)
            .setSession(session)
            .setOnDisconnect(OnDisconnect.ON_DISCONNECT_KEEP)
            .setCommand(command)
            .build();
        try {
            return follower.follow(blocking.exec(request));
        } catch (StatusRuntimeException e) {
            if (e.getStatus().getCode() != Status.Code.ALREADY_EXISTS || follower.heardAnything()) {
                throw e;
            }
        }
        follower.log.info("Session {} already runs on lease {} (started by an earlier attempt): attaching to it", session, leaseId);
        ExitStatus exit = attach(leaseId, session, follower);
        if (exit == null) {
            throw new IllegalStateException("lease " + leaseId + " said session " + session + " exists, then that it does not");
        }
        return exit;
    }

    /**
     * Attaches to session {@code session} of the lease from its first byte and follows it to its
     * exit; null when the lease has no such session (NOT_FOUND).
     */
    public ExitStatus attach(String leaseId, String session, Follower follower) {
        AttachRequest request = AttachRequest.newBuilder().setLeaseId(leaseId).setSession(session).build();
        try {
            return follower.follow(blocking.attach(request));
        } catch (StatusRuntimeException e) {
            if (e.getStatus().getCode() == Status.Code.NOT_FOUND && !follower.heardAnything()) {
                return null;
            }
            throw e;
        }
    }

    /**
     * The connection to mpool broke (UNAVAILABLE): a session's command runs on in the VM, and a
     * later attempt can follow it again.
     */
    public static boolean connectionLost(Throwable e) {
        for (Throwable t = e; t != null; t = t.getCause()) {
            if (t instanceof StatusRuntimeException s) {
                return s.getStatus().getCode() == Status.Code.UNAVAILABLE;
            }
        }
        return false;
    }

    /**
     * Follows a session's events: its output line by line to {@code lines} ({@code (line,
     * isStdErr)}), the part written before this stream attached announced as a replay in the task
     * log (the lines themselves go to {@code lines} unchanged, so their outputs count once), and a
     * marker line where mpool dropped bytes above its output cap.
     */
    public static final class Follower {
        private final BiConsumer<String, Boolean> lines;
        private final org.slf4j.Logger log;
        private boolean heard;
        private boolean replaying;

        /** A follower that feeds {@code lines} and writes its markers to {@code log}. */
        public Follower(BiConsumer<String, Boolean> lines, org.slf4j.Logger log) {
            this.lines = lines;
            this.log = log;
        }

        boolean heardAnything() {
            return heard;
        }

        ExitStatus follow(Iterator<ExecEvent> events) {
            LineSplitter out = new LineSplitter(line -> lines.accept(line, false));
            LineSplitter err = new LineSplitter(line -> lines.accept(line, true));
            ExitStatus exit = null;
            try {
                while (events.hasNext()) {
                    ExecEvent ev = events.next();
                    heard = true;
                    if (ev.getReplayed() != replaying && ev.getEventCase() != ExecEvent.EventCase.STARTED) {
                        replaying = ev.getReplayed();
                        if (replaying) {
                            log.info("Replaying the output the command wrote before this attempt attached (it was started by an earlier attempt):");
                        } else {
                            log.info("End of the replayed output.");
                        }
                    }
                    switch (ev.getEventCase()) {
                        case STDOUT -> out.push(ev.getStdout());
                        case STDERR -> err.push(ev.getStderr());
                        case DROPPED -> log.warn("[mpool dropped bytes {} to {} of the command's {} here: they were over the session's output cap]",
                            ev.getDropped().getFrom(), ev.getDropped().getTo(), ev.getDropped().getStream());
                        case EXIT -> exit = ev.getExit();
                        default -> { }
                    }
                }
            } finally {
                out.finish();
                err.finish();
            }
            if (exit == null) {
                throw new IllegalStateException("the command's stream ended without an exit status");
            }
            return exit;
        }
    }

    /** Runs a short command and returns its stdout; throws if it exits non-zero. */
    public String capture(String leaseId, Command command) {
        StringBuilder out = new StringBuilder();
        StringBuilder err = new StringBuilder();
        ExitStatus x = exec(leaseId, "", command, (line, isErr) -> (isErr ? err : out).append(line).append('\n'));
        if (x.getCode() != 0) {
            throw new IllegalStateException("`" + String.join(" ", command.getArgvList()) + "` exited with " + x.getCode() + ": " + err);
        }
        return out.toString();
    }

    /** Writes a local file into the VM at {@code remotePath} (parents are created), keeping its mode. */
    public void upload(String leaseId, Path local, String remotePath) throws IOException, InterruptedException {
        int mode = 0644;
        try {
            Set<PosixFilePermission> perms = Files.getPosixFilePermissions(local);
            mode = 0;
            for (PosixFilePermission p : perms) {
                mode |= 1 << (8 - p.ordinal());
            }
        } catch (UnsupportedOperationException ignored) {
            // keep 0644
        }
        UploadObserver observer = new UploadObserver();
        StreamObserver<UploadRequest> requests = async.upload(observer);
        CompletableFuture<UploadResponse> done = observer.done;
        try (InputStream in = Files.newInputStream(local)) {
            byte[] buf = new byte[1 << 20];
            boolean first = true;
            int n;
            while ((n = in.read(buf)) > 0 || first) {
                UploadRequest.Builder b = UploadRequest.newBuilder();
                if (first) {
                    b.setLeaseId(leaseId).setPath(remotePath).setMode(mode);
                    first = false;
                }
                if (n > 0) {
                    b.setData(ByteString.copyFrom(buf, 0, n));
                }
                // Flow control: send only when the transport takes more, so memory holds a chunk
                // or two whatever the file's size.
                observer.awaitReady();
                requests.onNext(b.build());
                if (n <= 0) {
                    break;
                }
            }
        } catch (IOException | RuntimeException | InterruptedException e) {
            requests.onError(e);
            throw e;
        }
        requests.onCompleted();
        try {
            done.get(10, TimeUnit.MINUTES);
        } catch (java.util.concurrent.ExecutionException e) {
            if (e.getCause() instanceof RuntimeException r) {
                throw r;
            }
            throw new IOException("uploading " + local + ": " + e.getCause(), e.getCause());
        } catch (java.util.concurrent.TimeoutException e) {
            throw new IOException("uploading " + local + " timed out", e);
        }
    }

    /** Reads {@code remotePath} from the VM into {@code local} (parents created), keeping its mode. */
    public void download(String leaseId, String remotePath, Path local) throws IOException {
        Files.createDirectories(local.toAbsolutePath().getParent());
        Iterator<DownloadChunk> chunks = blocking.download(DownloadRequest.newBuilder().setLeaseId(leaseId).setPath(remotePath).build());
        int mode = -1;
        try (OutputStream out = Files.newOutputStream(local)) {
            while (chunks.hasNext()) {
                DownloadChunk c = chunks.next();
                if (c.getOffset() == 0) {
                    mode = c.getMode();
                }
                c.getData().writeTo(out);
            }
        }
        if (mode > 0) {
            try {
                Set<PosixFilePermission> perms = java.util.EnumSet.noneOf(PosixFilePermission.class);
                for (PosixFilePermission p : PosixFilePermission.values()) {
                    if ((mode & (1 << (8 - p.ordinal()))) != 0) {
                        perms.add(p);
                    }
                }
                Files.setPosixFilePermissions(local, perms);
            } catch (UnsupportedOperationException ignored) {
                // not a POSIX file system
            }
        }
    }

    /** Regular files under {@code remoteDir}, as paths relative to it (none if it does not exist). */
    public List<String> listFiles(String leaseId, String remoteDir) {
        String out = capture(leaseId, Command.newBuilder()
            .addArgv("sh").addArgv("-c")
            .addArgv("[ -d \"$1\" ] || exit 0; cd \"$1\" && find . -type f -print0")
            .addArgv("sh").addArgv(remoteDir)
            .build());
        List<String> files = new ArrayList<>();
        for (String f : out.split("\0")) {
            f = f.strip();
            if (f.startsWith("./")) {
                files.add(f.substring(2));
            }
        }
        return files;
    }

    @Override
    public void close() {
        channel.shutdownNow();
        try {
            channel.awaitTermination(5, TimeUnit.SECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
        if (group != null) {
            group.shutdownGracefully(0, 1, TimeUnit.SECONDS);
        }
    }

    /** The response side of an Upload, with the request side's readiness for flow control. */
    private static final class UploadObserver implements ClientResponseObserver<UploadRequest, UploadResponse> {
        final CompletableFuture<UploadResponse> done = new CompletableFuture<>();
        private final Object ready = new Object();
        private volatile ClientCallStreamObserver<UploadRequest> requests;

        @Override
        public void beforeStart(ClientCallStreamObserver<UploadRequest> requests) {
            this.requests = requests;
            requests.setOnReadyHandler(this::wake);
        }

        private void wake() {
            synchronized (ready) {
                ready.notifyAll();
            }
        }

        /** Blocks until the call takes another message (or has ended). */
        void awaitReady() throws InterruptedException {
            synchronized (ready) {
                while (!done.isDone() && requests != null && !requests.isReady()) {
                    ready.wait(1000);
                }
            }
        }

        @Override
        public void onNext(UploadResponse value) {
            done.complete(value);
        }

        @Override
        public void onError(Throwable t) {
            done.completeExceptionally(t);
            wake();
        }

        @Override
        public void onCompleted() {
            done.complete(null);
            wake();
        }
    }

    /** Turns text chunks into lines (a line without a trailing newline is flushed at the end). */
    static final class LineSplitter {
        private final java.util.function.Consumer<String> sink;
        private final StringBuilder partial = new StringBuilder();

        LineSplitter(java.util.function.Consumer<String> sink) {
            this.sink = sink;
        }

        void push(String chunk) {
            int start = 0;
            for (int i = 0; i < chunk.length(); i++) {
                if (chunk.charAt(i) == '\n') {
                    partial.append(chunk, start, i);
                    String line = partial.toString();
                    partial.setLength(0);
                    sink.accept(line.endsWith("\r") ? line.substring(0, line.length() - 1) : line);
                    start = i + 1;
                }
            }
            partial.append(chunk, start, chunk.length());
        }

        void finish() {
            if (!partial.isEmpty()) {
                String line = partial.toString();
                partial.setLength(0);
                sink.accept(line);
            }
        }
    }
}
