package io.kestra.plugin.mpool;

import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;

/**
 * Which host to ask for a VM, and in what order: a pure function of what each host said about the
 * pool (GetPool), the same rule as the mpool CLI's ({@code src/fleet/choice.rs}).
 *
 * <ol>
 *   <li>Hosts with a ready VM (hot or warm), the most ready first, each asked not to wait.</li>
 *   <li>Then one host to wait on: the best {@code ready + coming - waiting}; the next best only if
 *       that one becomes unreachable.</li>
 *   <li>Hosts that did not answer come last; draining hosts and hosts without the pool never.</li>
 * </ol>
 * Ties are spread: among equal hosts the order starts at a caller-chosen offset.
 */
public final class HostChoice {
    private HostChoice() {
    }

    /** What one host said about the pool. */
    public record Seen(Kind kind, int ready, int coming, int waiting, boolean draining) {
        /** A host that answered GetPool. */
        public static Seen pool(int ready, int coming, int waiting, boolean draining) {
            return new Seen(Kind.POOL, ready, coming, waiting, draining);
        }

        /** A host that did not answer. */
        public static Seen silent() {
            return new Seen(Kind.SILENT, 0, 0, 0, false);
        }

        /** A host that has no such pool (or the token may not use it there). */
        public static Seen noPool() {
            return new Seen(Kind.NO_POOL, 0, 0, 0, false);
        }

        boolean usable() {
            return kind == Kind.POOL && !draining;
        }

        long outlook() {
            return (long) ready + coming - waiting;
        }
    }

    /** How a host answered. */
    public enum Kind { POOL, SILENT, NO_POOL }

    /** Ask host {@code host} (its index), waiting for a VM there or not. */
    public record Attempt(int host, boolean waits) {
    }

    /** The order to ask the hosts in; {@code spread} (random per call) rotates it among equals. */
    public static List<Attempt> plan(List<Seen> seen, int spread) {
        int n = Math.max(seen.size(), 1);
        List<Integer> rotated = new ArrayList<>();
        for (int i = 0; i < seen.size(); i++) {
            rotated.add(Math.floorMod(i + spread, n));
        }
        List<Integer> ready = new ArrayList<>(rotated.stream().filter(i -> seen.get(i).usable() && seen.get(i).ready() > 0).toList());
        ready.sort(Comparator.comparingInt((Integer i) -> seen.get(i).ready()).reversed());
        List<Integer> waits = new ArrayList<>(rotated.stream().filter(i -> seen.get(i).usable()).toList());
        waits.sort(Comparator.comparingLong((Integer i) -> seen.get(i).outlook()).reversed());
        List<Attempt> plan = new ArrayList<>();
        ready.forEach(i -> plan.add(new Attempt(i, false)));
        waits.forEach(i -> plan.add(new Attempt(i, true)));
        rotated.stream().filter(i -> seen.get(i).kind() == Kind.SILENT).forEach(i -> plan.add(new Attempt(i, true)));
        return plan;
    }
}
