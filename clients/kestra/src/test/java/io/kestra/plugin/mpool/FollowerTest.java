package io.kestra.plugin.mpool;

import ch.qos.logback.classic.Logger;
import ch.qos.logback.classic.spi.ILoggingEvent;
import ch.qos.logback.core.read.ListAppender;
import mpool.v1.PoolOuterClass.Dropped;
import mpool.v1.PoolOuterClass.ExecEvent;
import mpool.v1.PoolOuterClass.ExitStatus;
import org.junit.jupiter.api.Test;
import org.slf4j.LoggerFactory;

import java.util.ArrayList;
import java.util.List;
import java.util.UUID;

import static org.hamcrest.MatcherAssert.assertThat;
import static org.hamcrest.Matchers.*;

/**
 * How a followed session reaches the task log: every line once (replayed ones included, so the
 * outputs they carry count), the replayed part announced before it and its end after it, and a
 * marker where mpool dropped bytes.
 */
class FollowerTest {
    @Test
    void replayedLinesComeOnceBetweenMarkersAndDroppedBytesLeaveAMarker() {
        Logger logger = (Logger) LoggerFactory.getLogger("follower-" + UUID.randomUUID());
        ListAppender<ILoggingEvent> logged = new ListAppender<>();
        logged.start();
        logger.setLevel(ch.qos.logback.classic.Level.INFO);
        logger.addAppender(logged);
        List<String> lines = new ArrayList<>();
        MpoolClient.Follower f = new MpoolClient.Follower((line, err) -> lines.add((err ? "err: " : "out: ") + line), logger);

        ExitStatus exit = f.follow(List.of(
            ExecEvent.newBuilder().setStarted("s").build(),
            ExecEvent.newBuilder().setStdout("one\ntw").setReplayed(true).setOffset(6).build(),
            ExecEvent.newBuilder().setStderr("warn\n").setReplayed(true).setOffset(5).build(),
            ExecEvent.newBuilder().setDropped(Dropped.newBuilder().setStream("stdout").setFrom(6).setTo(1006)).setReplayed(true).build(),
            ExecEvent.newBuilder().setStdout("o\nthree\n").setOffset(1014).build(),
            ExecEvent.newBuilder().setExit(ExitStatus.newBuilder().setCode(7)).build()
        ).iterator());

        assertThat(exit.getCode(), is(7));
        assertThat(lines, contains("out: one", "err: warn", "out: two", "out: three"));
        List<String> messages = logged.list.stream().map(ILoggingEvent::getFormattedMessage).toList();
        assertThat(messages, contains(
            startsWith("Replaying the output"),
            allOf(containsString("dropped bytes 6 to 1006"), containsString("stdout")),
            is("End of the replayed output.")));
    }

    @Test
    void aLiveSessionHasNoReplayMarkers() {
        Logger logger = (Logger) LoggerFactory.getLogger("follower-" + UUID.randomUUID());
        ListAppender<ILoggingEvent> logged = new ListAppender<>();
        logged.start();
        logger.setLevel(ch.qos.logback.classic.Level.INFO);
        logger.addAppender(logged);
        List<String> lines = new ArrayList<>();
        MpoolClient.Follower f = new MpoolClient.Follower((line, err) -> lines.add(line), logger);

        f.follow(List.of(
            ExecEvent.newBuilder().setStdout("live\n").build(),
            ExecEvent.newBuilder().setExit(ExitStatus.newBuilder().setCode(0)).build()
        ).iterator());

        assertThat(lines, contains("live"));
        assertThat(logged.list, empty());
    }
}
