//! The projector (src/projector): a consumer group that applies each event once,
//! dead letters, restarts from the read model's checkpoint, the Go service's events.

mod consumer_group;
mod dead_letter;
mod go_compat;
mod restart;
