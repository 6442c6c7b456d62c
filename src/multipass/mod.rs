//! The multipassd client: transport (Unix socket or TCP, always TLS with a client certificate),
//! server verification, trust (`authenticate`), typed calls that hide the bidi-stream traps,
//! version gating and one error type.
