//! The federation across rounds, host side and device side, as pure state machines around
//! the round machines ([`crate::host::HostRound`], [`crate::edge::EdgeSession`]): what lasts
//! from one round to the next, what survives a restart, and what each round publishes.
//! Time, entropy, training and files stay with the drivers.

pub mod edge;
pub mod host;
pub mod steps;
