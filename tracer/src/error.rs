//! Typed errors of the tracer.

/// Everything that can go wrong talking to a live process.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error("{0}")]
    Other(String),
}
