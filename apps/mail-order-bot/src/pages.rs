//! The bot's pages in the operator console: outcomes and orders, with filters by outcome,
//! client and date, and one message in detail (sender, subject, reason, lines).
//!
//! Like the domain, this uses no runtime crate but `runtime-contracts`: it describes tables
//! and fields; the console renders and guards them.

use runtime_contracts::console::{
    ConsoleBlock, ConsoleError, ConsoleField, ConsoleFilter, ConsolePage, ConsolePages,
    ConsoleRequest, ConsoleRow, ConsoleTable, ConsoleView, FilterInput,
};
use runtime_contracts::BoxFuture;

use crate::domain::store::{OrderStore, RecordFilter};
use crate::domain::OutcomeKind;

/// Rows shown on one page.
const ROWS: i64 = 200;

/// The bot's console pages, reading its order store.
#[derive(Clone, Debug)]
pub struct BotPages {
    store: OrderStore,
}

impl BotPages {
    /// Pages over `store`.
    pub fn new(store: OrderStore) -> Self {
        Self { store }
    }
}

fn date(request: &ConsoleRequest, name: &str) -> Result<Option<String>, ConsoleError> {
    let Some(value) = request.param(name) else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let shaped = bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shaped {
        return Err(ConsoleError::BadRequest(format!(
            "{name}: {value:?} is not a date such as 2026-12-04"
        )));
    }
    Ok(Some(value.to_owned()))
}

fn filter(request: &ConsoleRequest, with_outcome: bool) -> Result<RecordFilter, ConsoleError> {
    let outcome = match request.param("outcome").filter(|_| with_outcome) {
        Some(o) if OutcomeKind::ALL.iter().any(|k| k.as_str() == o) => Some(o.to_owned()),
        Some(o) => {
            return Err(ConsoleError::BadRequest(format!(
                "outcome: {o:?} is not an outcome"
            )))
        }
        None => None,
    };
    Ok(RecordFilter {
        outcome,
        client: request.param("client").map(str::to_owned),
        from: date(request, "from")?,
        to: date(request, "to")?,
        limit: ROWS,
    })
}

fn unavailable(e: impl std::fmt::Display) -> ConsoleError {
    ConsoleError::Unavailable(format!("the order store: {e}"))
}

fn text(value: Option<&str>) -> String {
    value.unwrap_or("—").to_owned()
}

impl BotPages {
    fn filters(request: &ConsoleRequest, with_outcome: bool) -> ConsoleBlock {
        let mut inputs = Vec::new();
        if with_outcome {
            inputs.push(ConsoleFilter::new(
                request,
                "outcome",
                "Outcome",
                FilterInput::Choice(
                    OutcomeKind::ALL
                        .iter()
                        .map(|k| k.as_str().to_owned())
                        .collect(),
                ),
            ));
        }
        inputs.push(ConsoleFilter::new(
            request,
            "client",
            "Client",
            FilterInput::Text,
        ));
        inputs.push(ConsoleFilter::new(
            request,
            "from",
            "From",
            FilterInput::Date,
        ));
        inputs.push(ConsoleFilter::new(request, "to", "To", FilterInput::Date));
        ConsoleBlock::Filters(inputs)
    }

    async fn outcomes(&self, request: &ConsoleRequest) -> Result<ConsoleView, ConsoleError> {
        let rows = self
            .store
            .find_outcomes(&filter(request, true)?)
            .await
            .map_err(unavailable)?;
        let mut table = ConsoleTable::new(
            format!("Outcomes, newest first ({} shown)", rows.len()),
            &[
                "Recorded", "Outcome", "Client", "Sender", "Subject", "Order", "Reason",
            ],
        );
        for r in rows {
            table.rows.push(
                ConsoleRow::new(vec![
                    r.recorded_at,
                    r.outcome,
                    text(r.client_name.as_deref()),
                    text(r.sender.as_deref()),
                    text(r.subject.as_deref()),
                    r.order_id
                        .map_or_else(|| "—".to_owned(), |id| id.to_string()),
                    text(r.reason.as_deref()),
                ])
                .link("outcomes", r.message_identity),
            );
        }
        Ok(ConsoleView {
            title: "Outcomes".to_owned(),
            blocks: vec![Self::filters(request, true), ConsoleBlock::Table(table)],
        })
    }

    async fn orders(&self, request: &ConsoleRequest) -> Result<ConsoleView, ConsoleError> {
        let rows = self
            .store
            .find_orders(&filter(request, false)?)
            .await
            .map_err(unavailable)?;
        let mut table = ConsoleTable::new(
            format!("Orders, newest first ({} shown)", rows.len()),
            &["Order", "Created", "Client", "Sender", "Subject", "Lines"],
        );
        for (o, lines) in rows {
            table.rows.push(
                ConsoleRow::new(vec![
                    o.id.to_string(),
                    o.created_at,
                    o.client_name,
                    o.sender,
                    text(o.subject.as_deref()),
                    lines.to_string(),
                ])
                .link("outcomes", o.message_identity),
            );
        }
        Ok(ConsoleView {
            title: "Orders".to_owned(),
            blocks: vec![Self::filters(request, false), ConsoleBlock::Table(table)],
        })
    }

    async fn message(&self, identity: &str) -> Result<ConsoleView, ConsoleError> {
        let (outcome, order) = self.store.message(identity).await.map_err(unavailable)?;
        let Some(outcome) = outcome else {
            return Err(ConsoleError::NotFound(format!(
                "no message {identity:?} is recorded"
            )));
        };
        let mut fields = vec![
            ConsoleField::new("Message", &outcome.message_identity),
            ConsoleField::new("Sender", text(outcome.sender.as_deref())),
            ConsoleField::new("Subject", text(outcome.subject.as_deref())),
            ConsoleField::new("Outcome", &outcome.outcome),
            ConsoleField::new("Reason", text(outcome.reason.as_deref())),
            ConsoleField::new("Recorded", &outcome.recorded_at),
            ConsoleField::new("Deliveries seen", outcome.deliveries.to_string()),
        ];
        let mut blocks = Vec::new();
        match order {
            Some(order) => {
                fields.push(ConsoleField::new("Order", order.id.to_string()));
                fields.push(ConsoleField::new(
                    "Client",
                    format!("{} ({})", order.client_name, order.client_id),
                ));
                blocks.push(ConsoleBlock::Fields(fields));
                let mut lines = ConsoleTable::new(
                    format!("Lines of order {}", order.id),
                    &["Article", "Quantity", "Found in"],
                );
                for l in order.lines {
                    lines.rows.push(ConsoleRow::new(vec![
                        l.sku,
                        l.quantity.to_string(),
                        l.origin,
                    ]));
                }
                blocks.push(ConsoleBlock::Table(lines));
            }
            None => {
                blocks.push(ConsoleBlock::Fields(fields));
                blocks.push(ConsoleBlock::Note(
                    "No order was created from this message.".to_owned(),
                ));
            }
        }
        Ok(ConsoleView {
            title: format!("Message {}", outcome.message_identity),
            blocks,
        })
    }
}

impl ConsolePages for BotPages {
    fn pages(&self) -> Vec<ConsolePage> {
        vec![
            ConsolePage::new("outcomes", "Outcomes"),
            ConsolePage::new("orders", "Orders"),
        ]
    }

    fn render<'a>(
        &'a self,
        request: &'a ConsoleRequest,
    ) -> BoxFuture<'a, Result<ConsoleView, ConsoleError>> {
        Box::pin(async move {
            match (request.page.as_str(), request.item.as_deref()) {
                ("outcomes", None) => self.outcomes(request).await,
                ("orders", None) => self.orders(request).await,
                ("outcomes" | "orders", Some(identity)) => self.message(identity).await,
                (page, _) => Err(ConsoleError::NotFound(format!("no page {page:?}"))),
            }
        })
    }
}
