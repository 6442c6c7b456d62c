//! `mpool sim`: a multipassd stand-in speaking the same protocol.

pub mod ssh;
