//! Signed envelopes: with `signing_key_env` set on a Redis or AMQP queue, every envelope the
//! queue writes carries an HMAC-SHA256 over the queue's name and the envelope, and every
//! envelope it reads must carry a valid one. Anything that can write to the stream or the
//! exchange but does not hold the key (a compromised neighbour on a shared Redis, a stray
//! publisher) cannot inject a task: its entry is dead-lettered as `unauthenticated`.
//!
//! The sealed form is `plba-sig1:<64 hex digits>:<the JSON envelope>`. A queue without a key
//! writes bare JSON and reads both forms (a signature it cannot check is ignored), so a key
//! can be added or removed with a restart of every process.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The least key length, in bytes.
pub(crate) const MIN_KEY_BYTES: usize = 32;

const PREFIX: &[u8] = b"plba-sig1:";
const HEX_LEN: usize = 64;

/// Why an envelope read was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not an envelope at all (its bytes, JSON or schema).
    Undecodable(String),
    /// An envelope without a valid signature, on a queue that signs.
    Unauthenticated(String),
}

/// The key of one queue, and its name (a signature is valid on its own queue only).
#[derive(Clone)]
pub(crate) struct Signer {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

impl Signer {
    /// The signer of `queue` with the key held in the environment variable `var`; why not
    /// when it is unset, short, or a placeholder (never quoting the key).
    pub(crate) fn from_env(var: &str, queue: &str) -> Result<Self, String> {
        let key =
            std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?;
        Self::new(key.trim().as_bytes(), queue).map_err(|why| format!("the key in {var} {why}"))
    }

    /// The signer a queue's `signing_key_env` asks for: none when unset.
    pub(crate) fn of_queue(
        var: Option<&str>,
        queue: &str,
    ) -> Result<Option<Self>, runtime_contracts::QueueError> {
        var.map(|var| Self::from_env(var, queue))
            .transpose()
            .map_err(|why| {
                runtime_contracts::QueueError::Unavailable(format!("signing_key_env: {why}"))
            })
    }

    pub(crate) fn new(key: &[u8], queue: &str) -> Result<Self, String> {
        if let Some(why) = crate::secret::weakness(key, MIN_KEY_BYTES) {
            return Err(why);
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|e| e.to_string())?;
        mac.update(queue.as_bytes());
        mac.update(&[0]);
        Ok(Self { mac })
    }

    fn tag(&self, json: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(json);
        mac
    }

    /// `json` sealed with this key.
    pub(crate) fn seal(&self, json: &[u8]) -> Vec<u8> {
        let tag = self.tag(json).finalize().into_bytes();
        let mut out = Vec::with_capacity(PREFIX.len() + HEX_LEN + 1 + json.len());
        out.extend_from_slice(PREFIX);
        for b in tag {
            out.extend_from_slice(format!("{b:02x}").as_bytes());
        }
        out.push(b':');
        out.extend_from_slice(json);
        out
    }
}

/// The JSON of a sealed envelope and its signature's hex digits, if `raw` is sealed.
fn unseal(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = raw.strip_prefix(PREFIX)?;
    if rest.len() < HEX_LEN + 1 || rest[HEX_LEN] != b':' {
        return None;
    }
    Some((&rest[HEX_LEN + 1..], &rest[..HEX_LEN]))
}

fn unhex(hex: &[u8]) -> Option<Vec<u8>> {
    hex.chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(text, 16).ok()
        })
        .collect()
}

/// `json` as the queue writes it: sealed when the queue signs, bare otherwise.
pub(crate) fn seal(signer: Option<&Signer>, json: Vec<u8>) -> Vec<u8> {
    match signer {
        Some(signer) => signer.seal(&json),
        None => json,
    }
}

/// The JSON of an envelope read from the queue, once its signature is checked: a queue
/// that signs refuses a bare envelope and a wrong signature; one that does not ignores a
/// signature.
pub(crate) fn open<'a>(raw: &'a [u8], signer: Option<&Signer>) -> Result<&'a [u8], Refusal> {
    match (unseal(raw), signer) {
        (None, None) => Ok(raw),
        (Some((json, _)), None) => Ok(json),
        (None, Some(_)) => Err(Refusal::Unauthenticated(
            "the envelope carries no signature".into(),
        )),
        (Some((json, hex)), Some(signer)) => {
            let valid = unhex(hex).is_some_and(|tag| signer.tag(json).verify_slice(&tag).is_ok());
            if valid {
                Ok(json)
            } else {
                Err(Refusal::Unauthenticated(
                    "the envelope's signature is not valid for this queue's key".into(),
                ))
            }
        }
    }
}

/// Decodes an envelope read from the queue: its signature checked (see [`open`]), then
/// [`super::decode_envelope`].
pub(crate) fn decode(
    raw: &[u8],
    max_bytes: usize,
    signer: Option<&Signer>,
) -> Result<runtime_contracts::Task, Refusal> {
    if raw.len() > max_bytes.saturating_add(PREFIX.len() + HEX_LEN + 1) {
        return Err(Refusal::Undecodable(format!(
            "envelope of {} bytes is above the {max_bytes}-byte cap",
            raw.len()
        )));
    }
    let json = open(raw, signer)?;
    super::decode_envelope(json, max_bytes).map_err(Refusal::Undecodable)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0f3a9c1e7b2d4f6a8c0e1b3d5f7a9c2e";

    fn envelope() -> Vec<u8> {
        let task =
            runtime_contracts::Task::new("t", "job", "src", serde_json::json!({})).expect("task");
        serde_json::to_vec(&task).expect("json")
    }

    #[test]
    fn a_sealed_envelope_opens_with_its_key_on_its_queue_only() {
        let signer = Signer::new(KEY, "orders").expect("key");
        let sealed = seal(Some(&signer), envelope());
        assert!(sealed.starts_with(b"plba-sig1:"));
        assert!(decode(&sealed, 4096, Some(&signer)).is_ok());
        // Another queue, another key.
        let other_queue = Signer::new(KEY, "billing").expect("key");
        assert!(matches!(
            decode(&sealed, 4096, Some(&other_queue)),
            Err(Refusal::Unauthenticated(_))
        ));
        let other_key = Signer::new(b"9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b", "orders").expect("key");
        assert!(matches!(
            decode(&sealed, 4096, Some(&other_key)),
            Err(Refusal::Unauthenticated(_))
        ));
        // A changed envelope, a bare one, a mangled signature.
        let mut changed = sealed.clone();
        let at = changed.len() - 3;
        changed[at] ^= 1;
        assert!(matches!(
            decode(&changed, 4096, Some(&signer)),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            decode(&envelope(), 4096, Some(&signer)),
            Err(Refusal::Unauthenticated(_))
        ));
        let mut mangled = sealed.clone();
        mangled[PREFIX.len()] = b'z';
        assert!(matches!(
            decode(&mangled, 4096, Some(&signer)),
            Err(Refusal::Unauthenticated(_))
        ));
        // A queue without a key reads both forms.
        assert!(decode(&sealed, 4096, None).is_ok());
        assert!(decode(&envelope(), 4096, None).is_ok());
    }

    #[test]
    fn weak_keys_are_refused() {
        assert!(Signer::new(b"", "q").is_err());
        assert!(Signer::new(b"short", "q").is_err());
        assert!(Signer::new(b"change-me-change-me-change-me-change-me", "q").is_err());
    }
}
