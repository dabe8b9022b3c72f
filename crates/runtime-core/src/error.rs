use runtime_contracts::ModuleError;

use crate::config::ConfigReport;

/// Errors of the runtime core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// The configuration is invalid; nothing was started.
    #[error(transparent)]
    Config(#[from] ConfigReport),
    /// A module failed to register; nothing was started.
    #[error(transparent)]
    Module(#[from] ModuleError),
    /// The parts do not fit together (a source names a pool without a queue, ...).
    #[error("runtime composition: {0}")]
    Composition(String),
    /// The runtime is not in a state that allows this call.
    #[error("runtime is {0}")]
    State(&'static str),
}
