//! The user, its events, and validation as parsed value types. No I/O here:
//! a handler that holds a [`NewUser`] holds a valid one.

mod event;
pub mod ids;
pub mod partition_map;
#[cfg(test)]
mod proptests;
mod user;

pub use event::{
    EventDecodeError, EventFormat, EventPosition, SCHEMA_VERSION, UserCreated, go_time,
};
pub use partition_map::{MapRecord, MoveRecord, PartitionMap};
pub use user::{
    Email, FieldViolation, NewUser, RequestId, User, UserId, UserName, ValidationError,
};
