package io.kestra.plugin.mpool;

import org.junit.jupiter.api.extension.BeforeAllCallback;
import org.junit.jupiter.api.extension.ExtensionContext;

/** Starts the shared mpool stack before the Kestra test context (declare it before @KestraTest). */
public class MpoolStackExtension implements BeforeAllCallback {
    @Override
    public void beforeAll(ExtensionContext context) {
        MpoolStack.get();
    }
}
