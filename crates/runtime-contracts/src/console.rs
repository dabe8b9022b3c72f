//! Pages an application adds to the operator console.
//!
//! The runtime's console knows nothing of the business; a module that wants its own pages
//! (the mail bot's outcomes and orders) describes them as data: filters, tables and fields.
//! The runtime renders that data, escapes every string, and guards the pages like the rest of
//! the console (a read token to look). A module never writes HTML, so it cannot inject any,
//! and its pages cannot act: they only show.
//!
//! ```
//! use runtime_contracts::console::*;
//! use runtime_contracts::BoxFuture;
//! struct Pages;
//! impl ConsolePages for Pages {
//!     fn pages(&self) -> Vec<ConsolePage> {
//!         vec![ConsolePage::new("orders", "Orders")]
//!     }
//!     fn render<'a>(&'a self, request: &'a ConsoleRequest)
//!         -> BoxFuture<'a, Result<ConsoleView, ConsoleError>> {
//!         Box::pin(async move {
//!             let mut table = ConsoleTable::new("Orders", &["Id", "Client"]);
//!             table.rows.push(ConsoleRow::new(vec!["1".into(), "ACME".into()]).link("orders", "1"));
//!             Ok(ConsoleView { title: "Orders".into(), blocks: vec![ConsoleBlock::Table(table)] })
//!         })
//!     }
//! }
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::BoxFuture;

/// One page a module adds, listed in the console's navigation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsolePage {
    /// Its id in the address (`/ui/app/<id>`): letters, digits, `-` and `_`.
    pub id: String,
    /// Its title in the navigation.
    pub title: String,
}

impl ConsolePage {
    /// A page.
    pub fn new(id: impl Into<String>, title: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            title: title.into(),
        }
    }
}

/// What an operator asked for: a page, perhaps one item of it, and the filter values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleRequest {
    /// The page id.
    pub page: String,
    /// The item to show in detail, if any.
    pub item: Option<String>,
    /// Filter values by name; empty values are left out.
    pub params: BTreeMap<String, String>,
}

impl ConsoleRequest {
    /// The value of filter `name`, if given and not blank.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }
}

/// What a page shows, top to bottom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleView {
    /// The page's heading.
    pub title: String,
    /// Its content.
    pub blocks: Vec<ConsoleBlock>,
}

/// One part of a page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ConsoleBlock {
    /// A filter form; submitting it asks for the same page with the values.
    Filters(Vec<ConsoleFilter>),
    /// A table.
    Table(ConsoleTable),
    /// Label and value pairs (a detail).
    Fields(Vec<ConsoleField>),
    /// A paragraph of text.
    Note(String),
}

/// One input of a filter form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleFilter {
    /// Its parameter name.
    pub name: String,
    /// Its visible label.
    pub label: String,
    /// What kind of input.
    pub input: FilterInput,
    /// The value in force.
    pub value: String,
}

impl ConsoleFilter {
    /// A filter showing `request`'s value for `name`.
    pub fn new(
        request: &ConsoleRequest,
        name: impl Into<String>,
        label: impl Into<String>,
        input: FilterInput,
    ) -> Self {
        let name = name.into();
        let value = request.param(&name).unwrap_or_default().to_owned();
        Self {
            name,
            label: label.into(),
            input,
            value,
        }
    }
}

/// The kind of a filter input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FilterInput {
    /// Free text.
    Text,
    /// A date, `YYYY-MM-DD`.
    Date,
    /// One of these values (or none).
    Choice(Vec<String>),
}

/// A table with a caption.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleTable {
    /// Its caption (read out by screen readers).
    pub caption: String,
    /// Column headings.
    pub columns: Vec<String>,
    /// Rows, each with as many cells as there are columns.
    pub rows: Vec<ConsoleRow>,
}

impl ConsoleTable {
    /// An empty table.
    pub fn new(caption: impl Into<String>, columns: &[&str]) -> Self {
        Self {
            caption: caption.into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
        }
    }
}

/// One row; its first cell links to an item's detail when `link` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleRow {
    /// The cells' text.
    pub cells: Vec<String>,
    /// The detail its first cell opens: (page, item).
    pub link: Option<(String, String)>,
}

impl ConsoleRow {
    /// A row without a link.
    pub fn new(cells: Vec<String>) -> Self {
        Self { cells, link: None }
    }

    /// Links the row's first cell to `item` of `page`.
    pub fn link(mut self, page: impl Into<String>, item: impl Into<String>) -> Self {
        self.link = Some((page.into(), item.into()));
        self
    }
}

/// A label and its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleField {
    /// The label.
    pub label: String,
    /// The value.
    pub value: String,
}

impl ConsoleField {
    /// A field.
    pub fn new(label: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            value: value.into(),
        }
    }
}

/// Why a page could not be shown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// No such page or item (404).
    #[error("{0}")]
    NotFound(String),
    /// A filter value is not valid (400).
    #[error("{0}")]
    BadRequest(String),
    /// What the page reads from is unavailable (503).
    #[error("{0}")]
    Unavailable(String),
}

/// The pages a module adds to the console. Registered with
/// [`crate::ModuleRegistry::console`].
///
/// Rules:
/// - `pages` is fixed for the module's life; the console lists them in its navigation.
/// - `render` only reads: console pages have no actions, so a read token may see them.
/// - Filter values come from an operator; validate them and answer
///   [`ConsoleError::BadRequest`] rather than guessing.
pub trait ConsolePages: Send + Sync {
    /// The pages.
    fn pages(&self) -> Vec<ConsolePage>;
    /// The content of one page (or one item of it).
    fn render<'a>(
        &'a self,
        request: &'a ConsoleRequest,
    ) -> BoxFuture<'a, Result<ConsoleView, ConsoleError>>;
}
