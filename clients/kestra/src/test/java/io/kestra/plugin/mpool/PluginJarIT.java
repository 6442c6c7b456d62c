package io.kestra.plugin.mpool;

import io.kestra.core.docs.Document;
import io.kestra.core.docs.DocumentationGenerator;
import io.kestra.core.junit.annotations.KestraTest;
import io.kestra.core.plugins.PluginScanner;
import io.kestra.core.plugins.RegisteredPlugin;
import jakarta.inject.Inject;
import org.junit.jupiter.api.Test;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;

import static org.hamcrest.MatcherAssert.assertThat;
import static org.hamcrest.Matchers.*;

/**
 * The packaged plugin jar as Kestra loads it from a plugins directory: its manifest entries, the
 * task types it registers, and the documentation Kestra renders from its @Schema and @Plugin
 * annotations (runs after `package`, under failsafe).
 */
@KestraTest
class PluginJarIT {
    @Inject
    DocumentationGenerator documentationGenerator;

    @Test
    void theJarIsAKestraPluginWithDocs() throws Exception {
        Path jar = Path.of(System.getProperty("plugin.jar"));
        assertThat(jar + " exists", Files.isRegularFile(jar), is(true));
        Path plugins = Files.createTempDirectory("kestra-plugins-");
        Files.copy(jar, plugins.resolve(jar.getFileName()));

        List<RegisteredPlugin> found = new PluginScanner(getClass().getClassLoader()).scan(plugins);
        assertThat(found, hasSize(1));
        RegisteredPlugin plugin = found.getFirst();
        assertThat(plugin.title(), is("mpool"));
        assertThat(plugin.group(), is("io.kestra.plugin.mpool"));
        assertThat(plugin.version(), is("0.1.0"));
        assertThat(plugin.description(), containsString("Multipass"));
        assertThat(plugin.getTasks().stream().map(Class::getName).toList(), containsInAnyOrder(
            "io.kestra.plugin.mpool.Run", "io.kestra.plugin.mpool.Acquire",
            "io.kestra.plugin.mpool.Exec", "io.kestra.plugin.mpool.Release"));
        assertThat(plugin.getTaskRunners().stream().map(Class::getName).toList(), contains("io.kestra.plugin.mpool.runner.Mpool"));

        List<Document> docs = documentationGenerator.generate(plugin);
        Document run = docs.stream().filter(d -> d.getPath().endsWith("io.kestra.plugin.mpool.Run.md")).findFirst().orElseThrow(
            () -> new AssertionError("no Run doc among " + docs.stream().map(Document::getPath).toList()));
        assertThat(run.getBody(), containsString("Run commands in a clean VM from an mpool pool"));
        assertThat(run.getBody(), containsString("type: io.kestra.plugin.mpool.Run"));
        assertThat(run.getBody(), containsString("outputFiles"));
        assertThat(run.getBody(), containsString("exitCode"));
        Document runner = docs.stream().filter(d -> d.getPath().endsWith("io.kestra.plugin.mpool.runner.Mpool.md")).findFirst().orElseThrow();
        assertThat(runner.getBody(), containsString("type: io.kestra.plugin.mpool.runner.Mpool"));
        for (String task : List.of("Acquire", "Exec", "Release")) {
            Document d = docs.stream().filter(x -> x.getPath().endsWith("io.kestra.plugin.mpool." + task + ".md")).findFirst().orElseThrow();
            assertThat(task, d.getBody(), containsString("type: io.kestra.plugin.mpool." + task));
        }
    }
}
