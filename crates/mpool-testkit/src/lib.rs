//! What mpool's tests and benchmarks start.
