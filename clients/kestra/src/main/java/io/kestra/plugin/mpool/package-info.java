@PluginSubGroup(
    title = "mpool",
    description = "Run tasks in clean, warm Multipass VMs leased from an mpool pool: one-shot Run, Acquire/Exec/Release for several steps, and a task runner for script tasks.",
    categories = { PluginSubGroup.PluginCategory.INFRASTRUCTURE }
)
package io.kestra.plugin.mpool;

import io.kestra.core.models.annotations.PluginSubGroup;
