//! The simulator's SSH endpoints (one per running instance).
