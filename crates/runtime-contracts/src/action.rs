//! Operator actions: operations an application offers the people who run it, beside the
//! platform's own (replaying dead letters, pausing sources). The control plane serves each
//! as `POST /actions/{name}` for admin tokens, with a dry run that says what would happen;
//! the application's CLI and console call that route.
//!
//! An action changes the application's own records and may hand the runtime tasks to
//! publish (work to run again through a pool's handler); it never touches a queue itself.

use serde::{Deserialize, Serialize};

use crate::{BoxFuture, Task};

/// One action an application offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionSpec {
    /// Its name in the route (`outcomes.replay`).
    pub name: String,
    /// What it does, in a sentence.
    pub summary: String,
    /// Its parameters, by name, each with what it means.
    pub params: Vec<ActionParam>,
}

/// One parameter of an action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionParam {
    /// Its name in the request body.
    pub name: String,
    /// What it means and the values it takes.
    pub help: String,
    /// Whether a request must give it.
    pub required: bool,
}

/// What an action did, or (in a dry run) would do.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ActionReport {
    /// One line for people.
    pub message: String,
    /// The items it acted (or would act) on, as the application describes them.
    pub items: Vec<serde_json::Value>,
    /// Tasks the runtime publishes, each to its pool, when this is no dry run.
    #[serde(skip)]
    pub publish: Vec<(String, Task)>,
}

/// Why an action could not run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The request is wrong: a parameter is missing or not one the action takes.
    #[error("{0}")]
    BadRequest(String),
    /// What the action needs (its store) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
}

/// The actions of one application module.
pub trait OperatorActions: Send + Sync {
    /// The actions it offers.
    fn actions(&self) -> Vec<ActionSpec>;
    /// Runs action `name` with `params` (a JSON object); a dry run changes nothing and
    /// publishes nothing. `Ok(None)` when the module has no such action.
    fn run<'a>(
        &'a self,
        name: &'a str,
        params: &'a serde_json::Value,
        dry_run: bool,
    ) -> BoxFuture<'a, Result<Option<ActionReport>, ActionError>>;
}
