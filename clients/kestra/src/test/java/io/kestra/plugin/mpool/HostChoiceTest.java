package io.kestra.plugin.mpool;

import org.junit.jupiter.api.Test;

import java.util.List;

import static io.kestra.plugin.mpool.HostChoice.Attempt;
import static io.kestra.plugin.mpool.HostChoice.Seen;
import static org.hamcrest.MatcherAssert.assertThat;
import static org.hamcrest.Matchers.*;

/** The choice of host, the same rule as the CLI's: pure, no server. */
class HostChoiceTest {
    private static final Seen DRAINING = Seen.pool(9, 0, 0, true);

    private static Seen up(int ready, int coming, int waiting) {
        return Seen.pool(ready, coming, waiting, false);
    }

    @Test
    void theMostReadyHostFirstThenTheBestOutlookToWaitOn() {
        List<Attempt> p = HostChoice.plan(List.of(up(1, 0, 0), up(3, 0, 0), up(0, 2, 0)), 0);
        assertThat(p, contains(
            new Attempt(1, false), new Attempt(0, false),
            new Attempt(1, true), new Attempt(2, true), new Attempt(0, true)));
        // ready + coming - waiting: -1, 1, 3.
        p = HostChoice.plan(List.of(up(0, 2, 3), up(0, 1, 0), up(0, 4, 1)), 0);
        assertThat(p, contains(new Attempt(2, true), new Attempt(1, true), new Attempt(0, true)));
    }

    @Test
    void drainingAndPoollessHostsAreSkippedSilentOnesComeLast() {
        List<Attempt> p = HostChoice.plan(
            List.of(Seen.silent(), DRAINING, Seen.noPool(), up(0, 0, 0)), 0);
        assertThat(p, contains(new Attempt(3, true), new Attempt(0, true)));
    }

    @Test
    void tiesAreSpread() {
        List<Seen> equal = List.of(up(2, 0, 0), up(2, 0, 0), up(2, 0, 0));
        assertThat(List.of(0, 1, 2).stream().map(s -> HostChoice.plan(equal, s).getFirst().host()).toList(), contains(0, 1, 2));
    }

    @Test
    void handlesCarryTheirHost() {
        String h = LeaseHandle.encode("lease-abc", "https://mp-2.lab:7443");
        assertThat(h, not(containsString("/")));
        assertThat(LeaseHandle.decode(h), is(new LeaseHandle("lease-abc", "https://mp-2.lab:7443")));
        assertThat(LeaseHandle.decode("lease-abc"), is(new LeaseHandle("lease-abc", null)));
    }
}
