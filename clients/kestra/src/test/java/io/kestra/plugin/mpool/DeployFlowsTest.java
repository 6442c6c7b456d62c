package io.kestra.plugin.mpool;

import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.dataformat.yaml.YAMLFactory;
import io.kestra.core.junit.annotations.KestraTest;
import io.kestra.core.models.flows.Flow;
import io.kestra.core.models.validations.ModelValidator;
import io.kestra.core.serializers.YamlParser;
import jakarta.inject.Inject;
import org.junit.jupiter.api.Test;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.stream.Stream;

import static org.hamcrest.MatcherAssert.assertThat;
import static org.hamcrest.Matchers.*;

/**
 * The example flows in deploy/kestra: every one is YAML whose `commands` are plain strings (a
 * `key: value` inside an unquoted command turns it into a map), the mpool types they name exist,
 * and the flows that use only types on this classpath (the plugin's tasks and Kestra's core
 * tasks) are parsed and validated by Kestra itself.
 */
@KestraTest
class DeployFlowsTest {
    static final Path DEPLOY = Path.of("../../deploy/kestra");

    @Inject
    ModelValidator modelValidator;

    @Test
    void theExampleFlowsAreValid() throws Exception {
        List<Path> flows;
        try (Stream<Path> s = Files.list(DEPLOY)) {
            flows = s.filter(p -> p.toString().endsWith(".yaml")).sorted().toList();
        }
        assertThat(flows.stream().map(p -> p.getFileName().toString()).toList(), hasItems(
            "plugin-run.yaml", "plugin-multi-step.yaml", "task-runner.yaml", "http-request.yaml", "grpcurl.yaml", "fleet.yaml"));
        ObjectMapper yaml = new ObjectMapper(new YAMLFactory());
        for (Path p : flows) {
            String text = Files.readString(p);
            Object tree = yaml.readValue(text, Object.class);
            check(p.getFileName().toString(), tree);
        }
        for (String name : List.of("plugin-run.yaml", "plugin-multi-step.yaml", "http-request.yaml", "fleet.yaml")) {
            Flow flow = YamlParser.parse(Files.readString(DEPLOY.resolve(name)), Flow.class);
            modelValidator.validate(flow);
            assertThat(name, flow.getTasks(), not(empty()));
        }
    }

    /** Walks the tree: `commands` hold strings only; every mpool `type` names a class. */
    private static void check(String file, Object node) throws Exception {
        if (node instanceof Map<?, ?> m) {
            for (Map.Entry<?, ?> e : m.entrySet()) {
                if ("commands".equals(e.getKey())) {
                    assertThat(file + " commands", e.getValue(), instanceOf(List.class));
                    for (Object c : (List<?>) e.getValue()) {
                        assertThat(file + ": a command is not a string (quote it): " + c, c, instanceOf(String.class));
                    }
                }
                if ("type".equals(e.getKey()) && e.getValue() instanceof String t && t.startsWith("io.kestra.plugin.mpool.")) {
                    Class.forName(t);
                }
                check(file, e.getValue());
            }
        } else if (node instanceof List<?> l) {
            for (Object o : l) {
                check(file, o);
            }
        }
    }
}
