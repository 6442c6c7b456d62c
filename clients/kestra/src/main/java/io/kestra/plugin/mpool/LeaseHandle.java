package io.kestra.plugin.mpool;

import java.nio.charset.StandardCharsets;
import java.util.Base64;

/**
 * A lease id that carries its host, as the mpool CLI prints it: {@code LEASE_ID@ENDPOINT} with the
 * endpoint in URL-safe base64 without padding (no {@code /}, so it fits in a URL path). Acquire
 * outputs one when it chose among several endpoints; Exec and Release follow it to the host. A
 * plain lease id (mpool's ids never contain {@code @}) stays a plain lease id.
 */
public record LeaseHandle(String leaseId, String endpoint) {
    /** The handle of lease {@code leaseId} on the host at {@code endpoint}. */
    public static String encode(String leaseId, String endpoint) {
        return leaseId + "@" + Base64.getUrlEncoder().withoutPadding().encodeToString(endpoint.getBytes(StandardCharsets.UTF_8));
    }

    /** Reads a handle, or a plain lease id (then {@code endpoint} is null). */
    public static LeaseHandle decode(String s) {
        int at = s.lastIndexOf('@');
        if (at < 0) {
            return new LeaseHandle(s, null);
        }
        String endpoint;
        try {
            endpoint = new String(Base64.getUrlDecoder().decode(s.substring(at + 1)), StandardCharsets.UTF_8);
        } catch (IllegalArgumentException e) {
            throw new IllegalArgumentException("lease handle " + s + ": the part after '@' is not an encoded endpoint; pass Acquire's leaseId output as it is");
        }
        if (at == 0 || !(endpoint.startsWith("unix:") || endpoint.startsWith("http://") || endpoint.startsWith("https://"))) {
            throw new IllegalArgumentException("lease handle " + s + ": not LEASE_ID@ENDPOINT; pass Acquire's leaseId output as it is");
        }
        return new LeaseHandle(s.substring(0, at), endpoint);
    }
}
