//! The client directory: sender address or domain to client. Display names never match.

use std::collections::HashMap;

use runtime_contracts::ConfigProblem;
use serde::{Deserialize, Serialize};

/// One client as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientEntry {
    /// Stable client id, e.g. `C-1001`.
    pub id: String,
    /// Client name, for people.
    pub name: String,
    /// Exact sender addresses of this client.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Sender domains of this client (every address at the domain matches).
    #[serde(default)]
    pub domains: Vec<String>,
}

/// A resolved client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    /// Client id.
    pub id: String,
    /// Client name.
    pub name: String,
}

/// Looks clients up by sender address, then by the address's domain.
#[derive(Clone, Debug, Default)]
pub struct ClientDirectory {
    by_address: HashMap<String, Client>,
    by_domain: HashMap<String, Client>,
}

fn normalise(s: &str) -> String {
    s.trim().trim_end_matches('.').to_lowercase()
}

impl ClientDirectory {
    /// Every problem in the configured entries, keyed under `prefix` (`...clients`).
    pub fn problems(entries: &[ClientEntry], prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let key = format!("{prefix}[{i}]");
            if entry.id.trim().is_empty() {
                problems.push(ConfigProblem::new(format!("{key}.id"), "must not be empty"));
            }
            if entry.addresses.is_empty() && entry.domains.is_empty() {
                problems.push(ConfigProblem::new(
                    key.clone(),
                    "needs at least one address or domain",
                ));
            }
            for (j, address) in entry.addresses.iter().enumerate() {
                let a = normalise(address);
                let well_formed = a
                    .split_once('@')
                    .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
                if !well_formed {
                    problems.push(ConfigProblem::new(
                        format!("{key}.addresses[{j}]"),
                        format!("{address:?} is not an email address"),
                    ));
                }
                if let Some(other) = seen.insert(a, entry.id.clone()) {
                    problems.push(ConfigProblem::new(
                        format!("{key}.addresses[{j}]"),
                        format!("{address:?} is already listed for client {other}"),
                    ));
                }
            }
            for (j, domain) in entry.domains.iter().enumerate() {
                let d = normalise(domain);
                if d.is_empty() || d.contains('@') || !d.contains('.') {
                    problems.push(ConfigProblem::new(
                        format!("{key}.domains[{j}]"),
                        format!("{domain:?} is not a domain"),
                    ));
                }
                if let Some(other) = seen.insert(format!("@{d}"), entry.id.clone()) {
                    problems.push(ConfigProblem::new(
                        format!("{key}.domains[{j}]"),
                        format!("{domain:?} is already listed for client {other}"),
                    ));
                }
            }
        }
        problems
    }

    /// A directory of `entries` (assumed validated).
    pub fn new(entries: &[ClientEntry]) -> Self {
        let mut dir = Self::default();
        for entry in entries {
            let client = Client {
                id: entry.id.clone(),
                name: entry.name.clone(),
            };
            for a in &entry.addresses {
                dir.by_address.insert(normalise(a), client.clone());
            }
            for d in &entry.domains {
                dir.by_domain.insert(normalise(d), client.clone());
            }
        }
        dir
    }

    /// The client of a sender address (the bare address, never a display name).
    pub fn resolve(&self, sender: &str) -> Option<&Client> {
        let sender = normalise(sender);
        let (_, domain) = sender.rsplit_once('@')?;
        self.by_address
            .get(&sender)
            .or_else(|| self.by_domain.get(domain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> ClientDirectory {
        ClientDirectory::new(&[
            ClientEntry {
                id: "C-1".into(),
                name: "Acme".into(),
                addresses: vec![],
                domains: vec!["acme.example".into()],
            },
            ClientEntry {
                id: "C-2".into(),
                name: "Buyer at Acme's reseller".into(),
                addresses: vec!["Buyer@Acme.Example".into()],
                domains: vec![],
            },
        ])
    }

    #[test]
    fn address_beats_domain_and_case_does_not_matter() {
        let d = dir();
        assert_eq!(
            d.resolve("buyer@acme.example").map(|c| c.id.as_str()),
            Some("C-2")
        );
        assert_eq!(
            d.resolve("OTHER@ACME.EXAMPLE").map(|c| c.id.as_str()),
            Some("C-1")
        );
    }

    #[test]
    fn unknown_senders_and_non_addresses_resolve_to_nothing() {
        let d = dir();
        assert!(d.resolve("someone@evil.example").is_none());
        assert!(d.resolve("Acme").is_none());
        assert!(d.resolve("").is_none());
        assert!(
            d.resolve("x@sub.acme.example").is_none(),
            "subdomains are not the domain"
        );
    }

    #[test]
    fn every_bad_entry_is_reported() {
        let entries = vec![
            ClientEntry {
                id: "".into(),
                name: "n".into(),
                addresses: vec!["not-an-address".into()],
                domains: vec!["nodot".into()],
            },
            ClientEntry {
                id: "C-9".into(),
                name: "n".into(),
                addresses: vec![],
                domains: vec![],
            },
        ];
        let keys: Vec<String> = ClientDirectory::problems(&entries, "c")
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            ["c[0].id", "c[0].addresses[0]", "c[0].domains[0]", "c[1]"]
        );
    }
}
