//! The pool's decisions, as plain functions and data: a VM's state machine ([`vm`]), what
//! maintenance to do ([`decide`]), startup reconciliation ([`reconcile`]), what the daemon's
//! view of idle VMs means ([`drift`]), what a plan's outcome means ([`outcome`]), the lease book
//! ([`leases`]), fair share among owners ([`fair`]), what isolation means for a pool ([`isolation`]), callers' preheats of a pool ([`preheat`]), recurring periods with a higher floor ([`schedule`]), plans as idempotent steps ([`steps`]), the
//! ([`leases`]), fair share among owners ([`fair`]), plans as idempotent steps ([`steps`]), what cleanup removes ([`cleanup`]), in-place resizes ([`resize`]), the
//! engine's errors ([`error`]), and the state machine that ties them together ([`state`]): inputs in, store writes and effects out.

pub mod admission;
pub mod cleanup;
pub mod decide;
pub mod demand;
pub mod drift;
pub mod error;
pub mod fair;
pub mod isolation;
pub mod leases;
pub mod outcome;
pub mod preheat;
pub mod rebuild;
pub mod reconcile;
pub mod resize;
pub mod schedule;
pub mod state;
pub mod status;
pub mod steps;
pub mod vm;
