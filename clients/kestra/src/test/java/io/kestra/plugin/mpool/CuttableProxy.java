package io.kestra.plugin.mpool;

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;

/**
 * A TCP forwarder between a task and `mpool serve` that a test can cut: {@link #cut()} closes its
 * listener and every connection through it (the worker's side of the network is gone: calls in
 * flight fail UNAVAILABLE, new ones cannot connect), {@link #restore()} listens again on the same
 * port. It stands for a worker that died or lost the network mid-task.
 */
final class CuttableProxy implements AutoCloseable {
    private final int target;
    private final int port;
    private final List<Socket> open = new CopyOnWriteArrayList<>();
    private volatile ServerSocket listener;

    /** Forwards a free loopback port to {@code targetPort} on loopback. */
    CuttableProxy(int targetPort) throws IOException {
        this.target = targetPort;
        ServerSocket s = bind(0);
        this.port = s.getLocalPort();
        start(s);
    }

    /** The gRPC endpoint through this proxy. */
    String endpoint() {
        return "http://127.0.0.1:" + port;
    }

    /** Closes the listener and every connection through it. */
    synchronized void cut() throws IOException {
        ServerSocket s = listener;
        listener = null;
        if (s != null) {
            s.close();
        }
        for (Socket c : open) {
            c.close();
        }
        open.clear();
    }

    /** Listens again on the same port. */
    synchronized void restore() throws IOException {
        if (listener == null) {
            start(bind(port));
        }
    }

    @Override
    public void close() throws IOException {
        cut();
    }

    private static ServerSocket bind(int port) throws IOException {
        ServerSocket s = new ServerSocket();
        s.setReuseAddress(true);
        s.bind(new InetSocketAddress(InetAddress.getLoopbackAddress(), port));
        return s;
    }

    private void start(ServerSocket s) {
        listener = s;
        Thread accept = new Thread(() -> {
            while (!s.isClosed()) {
                try {
                    Socket in = s.accept();
                    Socket out;
                    try {
                        out = new Socket(InetAddress.getLoopbackAddress(), target);
                    } catch (IOException e) {
                        in.close();
                        continue;
                    }
                    open.add(in);
                    open.add(out);
                    pipe(in, out);
                    pipe(out, in);
                } catch (IOException e) {
                    // closed by cut(), or mpool refused: the client sees the connection drop
                }
            }
        }, "cuttable-proxy-accept");
        accept.setDaemon(true);
        accept.start();
    }

    private static void pipe(Socket from, Socket to) {
        Thread t = new Thread(() -> {
            try (InputStream in = from.getInputStream(); OutputStream out = to.getOutputStream()) {
                in.transferTo(out);
            } catch (IOException e) {
                // cut
            } finally {
                try {
                    from.close();
                    to.close();
                } catch (IOException ignored) {
                    // already closed
                }
            }
        }, "cuttable-proxy-pipe");
        t.setDaemon(true);
        t.start();
    }
}
