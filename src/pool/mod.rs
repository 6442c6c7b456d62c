//! The pool engine: keeps each pool's VMs ready, hands them out under leases without races,
//! resets them after use, and never loses or leaks a VM, even across crashes.
//!
//! The decisions are plain logic ([`vm`] state machine, [`decide`] maintenance, [`reconcile`]
//! startup) with unit tests and no I/O; the [`engine`] actor owns all pool state and applies
//! events; [`plans`] are the sequences of daemon and SSH steps; [`scheduler`] orders daemon
//! calls; [`ports`] are the traits the real adapters and test fakes implement.

pub mod decide;
pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod error;
#[cfg(test)]
pub mod fake;
pub mod leases;
#[cfg(test)]
mod model_tests;
pub mod plans;
pub mod steps;
pub mod ports;
pub mod reconcile;
pub mod scheduler;
pub mod vm;
