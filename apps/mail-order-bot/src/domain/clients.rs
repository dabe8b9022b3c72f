//! The client directory: sender address or domain to client. Display names never match.

use std::collections::HashMap;

use runtime_contracts::ConfigProblem;
use serde::{Deserialize, Serialize};

use super::message::PartKind;

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
    /// Which attachment kinds are read for this client (`csv`, `xlsx`, `xls`, `ods`); all
    /// when absent, none when empty.
    #[serde(default)]
    pub attachments: Option<Vec<PartKind>>,
    /// Whether order lines in the message text are read (default true).
    #[serde(default = "yes")]
    pub read_body: bool,
    /// Take this client's mail even when its sender is not authenticated (for a sender
    /// whose mail system cannot sign): forged mail in its name then makes orders too.
    #[serde(default)]
    pub allow_unauthenticated: bool,
}

fn yes() -> bool {
    true
}

/// A resolved client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    /// Client id.
    pub id: String,
    /// Client name.
    pub name: String,
    /// Attachment kinds read; `None` means all.
    pub attachments: Option<Vec<PartKind>>,
    /// Whether the message text is read.
    pub read_body: bool,
    /// Whether unauthenticated mail in its name is taken.
    pub allow_unauthenticated: bool,
}

impl Client {
    /// Whether lines found in a part of `kind` count for this client.
    pub fn reads(&self, kind: PartKind) -> bool {
        match kind {
            PartKind::Body => self.read_body,
            other => self.attachments.as_ref().is_none_or(|a| a.contains(&other)),
        }
    }
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
                attachments: entry.attachments.clone(),
                read_body: entry.read_body,
                allow_unauthenticated: entry.allow_unauthenticated,
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

fn split_list(cell: &str) -> Vec<String> {
    cell.split([';', ',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Reads clients from a TOML file (`[[clients]]` tables with the fields of
/// [`ClientEntry`]) or a CSV file (header `id,name,addresses,domains[,attachments][,read_body]`,
/// lists separated by `;`). The error says which file and what is wrong.
pub fn load_clients_file(path: &std::path::Path) -> Result<Vec<ClientEntry>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if !is_csv {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            clients: Vec<ClientEntry>,
        }
        return toml::from_str::<File>(&text)
            .map(|f| f.clients)
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.trim_start_matches('\u{feff}').as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let (Some(id), Some(name)) = (column("id"), column("name")) else {
        return Err(format!(
            "{}: the header needs id and name columns",
            path.display()
        ));
    };
    let (addresses, domains) = (column("addresses"), column("domains"));
    let (attachments, read_body) = (column("attachments"), column("read_body"));
    let mut entries = Vec::new();
    for (n, record) in reader.records().enumerate() {
        let record = record.map_err(|e| format!("{} row {}: {e}", path.display(), n + 2))?;
        let get = |i: Option<usize>| i.and_then(|i| record.get(i)).unwrap_or("");
        let kinds = match attachments.map(|i| record.get(i).unwrap_or("")) {
            None => None,
            Some(cell) if cell.eq_ignore_ascii_case("all") => None,
            Some(cell) => Some(
                split_list(cell)
                    .iter()
                    .map(|k| {
                        serde_json::from_value::<PartKind>(serde_json::Value::String(
                            k.to_lowercase(),
                        ))
                        .map_err(|_| {
                            format!(
                                "{} row {}: unknown attachment kind {k:?}",
                                path.display(),
                                n + 2
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        entries.push(ClientEntry {
            id: get(Some(id)).to_owned(),
            name: get(Some(name)).to_owned(),
            addresses: split_list(get(addresses)),
            domains: split_list(get(domains)),
            attachments: kinds,
            read_body: !matches!(get(read_body).to_lowercase().as_str(), "false" | "no" | "0"),
            allow_unauthenticated: false,
        });
    }
    Ok(entries)
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
                attachments: None,
                read_body: true,
                allow_unauthenticated: false,
            },
            ClientEntry {
                id: "C-2".into(),
                name: "Buyer at Acme's reseller".into(),
                addresses: vec!["Buyer@Acme.Example".into()],
                domains: vec![],
                attachments: None,
                read_body: true,
                allow_unauthenticated: false,
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
                attachments: None,
                read_body: true,
                allow_unauthenticated: false,
            },
            ClientEntry {
                id: "C-9".into(),
                name: "n".into(),
                addresses: vec![],
                domains: vec![],
                attachments: None,
                read_body: true,
                allow_unauthenticated: false,
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

    #[test]
    fn clients_from_toml_and_csv_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let toml_path = dir.path().join("clients.toml");
        std::fs::write(
            &toml_path,
            "[[clients]]\nid = \"C-1\"\nname = \"Acme\"\ndomains = [\"acme.example\"]\nattachments = [\"csv\"]\n",
        )
        .expect("write");
        let from_toml = load_clients_file(&toml_path).expect("toml");
        assert_eq!(from_toml[0].attachments, Some(vec![PartKind::Csv]));
        let csv_path = dir.path().join("clients.csv");
        std::fs::write(
            &csv_path,
            "id,name,addresses,domains,attachments,read_body\nC-2,Nordic,a@n.example;b@n.example,,xlsx;ods,no\nC-3,Ural,,ural.example,all,yes\n",
        )
        .expect("write");
        let from_csv = load_clients_file(&csv_path).expect("csv");
        assert_eq!(from_csv[0].addresses, ["a@n.example", "b@n.example"]);
        assert_eq!(
            from_csv[0].attachments,
            Some(vec![PartKind::Xlsx, PartKind::Ods])
        );
        assert!(!from_csv[0].read_body);
        assert_eq!(from_csv[1].attachments, None);
        let d = ClientDirectory::new(&from_csv);
        let c2 = d.resolve("a@n.example").expect("C-2");
        assert!(!c2.reads(PartKind::Body) && c2.reads(PartKind::Ods) && !c2.reads(PartKind::Csv));
        std::fs::write(&csv_path, "id,name,attachments\nC-4,X,pdf\n").expect("write");
        assert!(load_clients_file(&csv_path)
            .expect_err("pdf is not a kind")
            .contains("unknown attachment kind"));
        assert!(load_clients_file(&dir.path().join("missing.toml"))
            .expect_err("missing")
            .contains("missing.toml"));
    }
}
