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

/// Middleware state: the tokens and the role a route needs.
#[derive(Clone, Debug)]
pub(crate) struct Guard {
    pub(crate) tokens: std::sync::Arc<Tokens>,
    pub(crate) role: Role,
}

pub(crate) async fn require(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match guard.tokens.authorize(header, guard.role) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
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
