use runtime_contracts::{BoxFuture, CancelSignal};
use tokio_util::sync::CancellationToken;

/// A [`CancelSignal`] backed by a tokio-util cancellation token.
#[derive(Clone, Debug, Default)]
pub struct TokenSignal(pub CancellationToken);

impl CancelSignal for TokenSignal {
    fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }

    fn cancelled(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.cancelled())
    }
}
