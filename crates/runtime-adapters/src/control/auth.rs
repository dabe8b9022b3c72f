//! Bearer tokens with two roles, compared in constant time.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Anyone (health probes, when configured open).
    Open,
    /// A read or an admin token.
    Read,
    /// An admin token.
    Admin,
}

/// The configured tokens. Never printed: `Debug` shows counts only.
#[derive(Clone, Default)]
pub struct Tokens {
    read: Vec<Vec<u8>>,
    admin: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("read", &self.read.len())
            .field("admin", &self.admin.len())
            .finish()
    }
}

fn matches_any(candidate: &[u8], tokens: &[Vec<u8>]) -> bool {
    // Every token is compared, so the time taken does not say which one was close.
    tokens.iter().fold(0u8, |found, t| {
        found | t.as_slice().ct_eq(candidate).unwrap_u8()
    }) == 1
}

impl Tokens {
    /// Tokens from lists; empty strings are ignored.
    pub fn new(read: &[String], admin: &[String]) -> Self {
        let keep = |v: &[String]| {
            v.iter()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
                .map(|t| t.as_bytes().to_vec())
                .collect()
        };
        Self {
            read: keep(read),
            admin: keep(admin),
        }
    }

    /// Whether any token is configured.
    pub fn any(&self) -> bool {
        !self.read.is_empty() || !self.admin.is_empty()
    }

    /// How logs name the holder of `token`: its role, its place in the list and the first
    /// hex digits of its SHA-256 (which say which token acted without revealing it).
    pub fn label_of(&self, token: &str) -> Option<String> {
        use sha2::Digest as _;
        let token = token.trim().as_bytes();
        let digest = sha2::Sha256::digest(token);
        let fingerprint: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        let place = |tokens: &[Vec<u8>]| {
            tokens
                .iter()
                .position(|t| bool::from(t.as_slice().ct_eq(token)))
        };
        if let Some(n) = place(&self.admin) {
            Some(format!("admin token {} (sha256 {fingerprint}…)", n + 1))
        } else {
            place(&self.read).map(|n| format!("read token {} (sha256 {fingerprint}…)", n + 1))
        }
    }

    /// The role a presented token carries, if it is one of the configured tokens.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let token = token.trim().as_bytes();
        if token.is_empty() {
            None
        } else if matches_any(token, &self.admin) {
            Some(Role::Admin)
        } else if matches_any(token, &self.read) {
            Some(Role::Read)
        } else {
            None
        }
    }

    /// Checks a request's `Authorization` header against `role`.
    pub fn authorize(&self, authorization: Option<&str>, role: Role) -> Result<(), ApiError> {
        if role == Role::Open {
            return Ok(());
        }
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        if !self.any() {
            // Loopback-only deployment without tokens: the bind address is the boundary.
            return Ok(());
        }
        let Some(value) = authorization else {
            return Err(unauthorized("a bearer token is required"));
        };
        let Some(token) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        else {
            return Err(unauthorized(
                "the Authorization header must be `Bearer <token>`",
            ));
        };
        let token = token.trim().as_bytes();
        if matches_any(token, &self.admin) {
            return Ok(());
        }
        if matches_any(token, &self.read) {
            return match role {
                Role::Admin => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this route needs an admin token",
                )),
                _ => Ok(()),
            };
        }
        Err(unauthorized("the token is not valid"))
    }
}

/// Failed token checks per client address: beyond [`MAX_FAILURES`] in a
/// [`FAILURE_WINDOW`], that address's tokens are not checked until the window ends (`429`
/// with `Retry-After`), so guessing is slowed to a few tries a minute without a request
/// ever holding a slot while it waits.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    failures:
        std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant)>>,
}

/// Failed checks an address may make in a window.
pub(crate) const MAX_FAILURES: u32 = 10;
/// The window.
pub(crate) const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Addresses remembered at most (the oldest are forgotten first).
const MAX_ADDRESSES: usize = 10_000;

impl Throttle {
    /// How long `ip` must wait before its tokens are checked again, if it must.
    pub(crate) fn blocked(&self, ip: Option<std::net::IpAddr>) -> Option<std::time::Duration> {
        let ip = ip?;
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let (count, since) = map.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (*count >= MAX_FAILURES).then_some(left)
    }

    /// A failed check from `ip`.
    pub(crate) fn failed(&self, ip: Option<std::net::IpAddr>) {
        let Some(ip) = ip else { return };
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ADDRESSES {
            map.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            if map.len() >= MAX_ADDRESSES {
                if let Some(oldest) = map.iter().min_by_key(|(_, (_, s))| *s).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
        }
        let entry = map.entry(ip).or_insert((0, std::time::Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, std::time::Instant::now());
        }
        entry.0 += 1;
    }

    /// The refusal while blocked.
    pub(crate) fn refusal(left: std::time::Duration) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_failures",
            "too many wrong tokens from this address; try again later",
        )
        .with_retry_after(left.as_secs().max(1))
    }
}

/// The client's address, when the server recorded it.
pub(crate) fn client_ip(request: &Request) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Middleware state: the tokens, the failure throttle and the role a route needs.
#[derive(Clone, Debug)]
pub(crate) struct Guard {
    pub(crate) tokens: std::sync::Arc<Tokens>,
    pub(crate) throttle: std::sync::Arc<Throttle>,
    pub(crate) role: Role,
}

pub(crate) async fn require(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let ip = client_ip(&request);
    if guard.role != Role::Open {
        if let Some(left) = guard.throttle.blocked(ip) {
            return Throttle::refusal(left).into_response();
        }
    }
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match guard.tokens.authorize(header, guard.role) {
        Ok(()) => {
            let acts = !matches!(
                *request.method(),
                axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
            );
            if !acts {
                return next.run(request).await;
            }
            // Every request that changes something says who made it.
            let actor = header
                .and_then(|h| {
                    h.strip_prefix("Bearer ")
                        .or_else(|| h.strip_prefix("bearer "))
                })
                .and_then(|t| guard.tokens.label_of(t))
                .unwrap_or_else(|| "a loopback client (no tokens are configured)".to_owned());
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let response = next.run(request).await;
            tracing::info!(%actor, %method, %path, status = response.status().as_u16(), "operator request");
            response
        }
        Err(e) => {
            if e.status == StatusCode::UNAUTHORIZED {
                guard.throttle.failed(ip);
            }
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let t = Tokens::new(&["r".into()], &["a".into(), "".into()]);
        assert!(t.authorize(Some("Bearer a"), Role::Admin).is_ok());
        assert!(t.authorize(Some("Bearer r"), Role::Read).is_ok());
        assert_eq!(
            t.authorize(Some("Bearer r"), Role::Admin)
                .err()
                .map(|e| e.status),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            t.authorize(Some("Bearer x"), Role::Read)
                .err()
                .map(|e| e.status),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            t.authorize(None, Role::Read).err().map(|e| e.status),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            t.authorize(Some("Basic YTpi"), Role::Read)
                .err()
                .map(|e| e.status),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert!(t.authorize(None, Role::Open).is_ok());
        assert!(format!("{t:?}").contains("admin: 1"));
    }
}
