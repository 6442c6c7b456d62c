package io.kestra.plugin.mpool;

import io.kestra.core.models.annotations.PluginProperty;
import io.kestra.core.models.property.Property;
import io.kestra.core.models.tasks.Task;
import io.kestra.core.runners.RunContext;
import io.swagger.v3.oas.annotations.media.Schema;
import jakarta.validation.constraints.NotNull;
import lombok.*;
import lombok.experimental.SuperBuilder;

import java.util.List;

/**
 * The connection block every mpool task shares; set it once per namespace with
 * {@code pluginDefaults} (type {@code io.kestra.plugin.mpool}).
 */
@SuperBuilder
@ToString
@EqualsAndHashCode
@Getter
@NoArgsConstructor
public abstract class AbstractMpoolTask extends Task implements MpoolConnection {
    @Schema(
        title = "mpool's gRPC endpoint.",
        description = "`unix:/run/mpool/mpool.sock` (the Unix socket, on the mpool host), `http://127.0.0.1:7070` " +
            "(plaintext TCP, loopback only, with a token) or `https://pool.example:7070` (TLS, with a token or mTLS)."
    )
    @NotNull
    @Builder.Default
    @PluginProperty(group = "connection")
    protected Property<String> endpoint = Property.ofValue(DEFAULT_ENDPOINT);

    @Schema(
        title = "Several mpool hosts to choose among (instead of `endpoint`).",
        description = "Each host runs its own `mpool serve`. Acquire and Run ask every host about the pool (GetPool, " +
            "cached 1.5 s) and lease from the one with the most ready VMs, spreading ties; a host that is down, draining " +
            "or has no VM in time is left for the next; when none has a ready VM they wait on the host with the best " +
            "`ready + coming - waiting`. Acquire's `leaseId` then names its host, so Exec and Release need nothing else. " +
            "The same token and CA are used for every host."
    )
    @PluginProperty(group = "connection")
    protected Property<List<String>> endpoints;

    @Schema(
        title = "Bearer token for TCP endpoints.",
        description = "A token from `mpool token new`, sent as `authorization: Bearer ...`. Keep it in a secret: `{{ secret('MPOOL_TOKEN') }}`."
    )
    @PluginProperty(secret = true, group = "connection")
    protected Property<String> token;

    @Schema(
        title = "CA certificate (PEM text) that signed the server's certificate, for `https://` endpoints.",
        description = "Default: the JVM's trust store."
    )
    @PluginProperty(group = "connection")
    protected Property<String> ca;
}
