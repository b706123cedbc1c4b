//! gRPC handlers: decode, validate into domain types, call the adapters, and
//! map every error to a `tonic::Status` (in [`error`]).

pub mod error;
pub mod health;
pub mod limit;
pub mod oversize;
mod projection_service;
mod user_service;

pub use error::ApiError;
pub use health::{HealthRegistry, Needs};
pub use projection_service::ProjectionApi;
pub use user_service::UserApi;
