//! Value types that parse and validate on construction.
//!
//! Limits (also documented in the proto and README): a name is 1 to 128
//! characters after trimming, with no control characters; an email is one
//! `local@domain` address of at most 254 characters (local part at most 64,
//! domain with a dot, no spaces); an id is 1 to 2^63-1; a request id is 1 to
//! 128 visible ASCII characters (no spaces).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest name accepted, in characters.
pub const NAME_MAX_CHARS: usize = 128;
/// Longest email accepted, in bytes (RFC 5321's path limit).
pub const EMAIL_MAX_LEN: usize = 254;
/// Longest request id accepted.
pub const REQUEST_ID_MAX_LEN: usize = 128;

/// One field that failed validation, in the shape of `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

/// Every field that failed, so the caller can fix them all in one go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
pub struct ValidationError(pub Vec<FieldViolation>);

impl ValidationError {
    fn one(field: &'static str, description: impl Into<String>) -> Self {
        Self(vec![FieldViolation {
            field,
            description: description.into(),
        }])
    }
}

/// A user id: positive, fits Go's `int` and Java's `long`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(i64);

impl UserId {
    pub fn parse(id: i64) -> Result<Self, ValidationError> {
        if id > 0 {
            Ok(Self(id))
        } else {
            Err(ValidationError::one("id", "must be a positive integer"))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A display name, trimmed, 1 to [`NAME_MAX_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserName(String);

impl UserName {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let name = raw.trim();
        let err = |d: &str| ValidationError::one("name", d);
        if name.is_empty() {
            return Err(err("must not be empty"));
        }
        if name.chars().count() > NAME_MAX_CHARS {
            return Err(err(&format!("must be at most {NAME_MAX_CHARS} characters")));
        }
        if name.chars().any(char::is_control) {
            return Err(err("must not contain control characters"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An email address, syntactically plausible; the domain is lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let email = raw.trim();
        let err = |d: &str| ValidationError::one("email", d);
        if email.is_empty() {
            return Err(err("must not be empty"));
        }
        if email.len() > EMAIL_MAX_LEN {
            return Err(err(&format!("must be at most {EMAIL_MAX_LEN} bytes")));
        }
        let Some((local, domain)) = email.rsplit_once('@') else {
            return Err(err("must look like name@example.com"));
        };
        let bad_char = |c: char| c.is_whitespace() || c.is_control() || c == '@';
        let domain_ok = domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && domain
                .chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '.');
        if local.is_empty() || local.len() > 64 || local.chars().any(bad_char) || !domain_ok {
            return Err(err("must look like name@example.com"));
        }
        Ok(Self(format!("{local}@{}", domain.to_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client's idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    /// `None` for an empty key: the request is then not deduplicated.
    pub fn parse(raw: &str) -> Result<Option<Self>, ValidationError> {
        if raw.is_empty() {
            return Ok(None);
        }
        if raw.len() > REQUEST_ID_MAX_LEN || !raw.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ValidationError::one(
                "request_id",
                format!("must be 1 to {REQUEST_ID_MAX_LEN} visible ASCII characters (no spaces)"),
            ));
        }
        Ok(Some(Self(raw.to_owned())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated CreateUser command: every field checked, all failures reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    pub id: Option<UserId>,
    pub name: UserName,
    pub email: Email,
    pub request_id: Option<RequestId>,
}

impl NewUser {
    pub fn parse(
        id: Option<i64>,
        name: &str,
        email: &str,
        request_id: &str,
    ) -> Result<Self, ValidationError> {
        let id = id.map(UserId::parse).transpose();
        let name = UserName::parse(name);
        let email = Email::parse(email);
        let request_id = RequestId::parse(request_id);
        match (id, name, email, request_id) {
            (Ok(id), Ok(name), Ok(email), Ok(request_id)) => Ok(Self {
                id,
                name,
                email,
                request_id,
            }),
            (id, name, email, request_id) => {
                let violations = [id.err(), name.err(), email.err(), request_id.err()]
                    .into_iter()
                    .flatten()
                    .flat_map(|e| e.0)
                    .collect();
                Err(ValidationError(violations))
            }
        }
    }

    /// What makes two requests with one request id "the same request".
    pub fn fingerprint(&self) -> String {
        serde_json::json!([self.id, self.name, self.email]).to_string()
    }
}

/// A user as the read model holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub name: UserName,
    pub email: Email,
    /// Milliseconds since the Unix epoch at which the command was accepted.
    pub created_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_user_parses_and_is_normalised() {
        let u = NewUser::parse(Some(7), "  Ada Lovelace ", "ada@Example.COM", "req-1").unwrap();
        assert_eq!(u.id, Some(UserId(7)));
        assert_eq!(u.name.as_str(), "Ada Lovelace");
        assert_eq!(u.email.as_str(), "ada@example.com");
        assert_eq!(u.request_id.unwrap().as_str(), "req-1");
    }

    #[test]
    fn all_violations_are_reported_at_once() {
        let err = NewUser::parse(Some(0), " ", "not-an-email", "has space").unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|v| v.field).collect();
        assert_eq!(fields, ["id", "name", "email", "request_id"]);
    }

    #[test]
    fn limits_are_enforced() {
        assert!(UserName::parse(&"x".repeat(NAME_MAX_CHARS)).is_ok());
        assert!(UserName::parse(&"x".repeat(NAME_MAX_CHARS + 1)).is_err());
        assert!(UserName::parse("bell\u{7}").is_err());
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(Email::parse(&long_local).is_err());
        for bad in [
            "a@b",
            "@example.com",
            "a b@example.com",
            "a@.com",
            "a@example..com",
            "a@@b.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert!(RequestId::parse("").unwrap().is_none());
        assert!(RequestId::parse(&"r".repeat(129)).is_err());
    }

    #[test]
    fn fingerprint_differs_when_fields_differ() {
        let a = NewUser::parse(None, "Ada", "ada@example.com", "r").unwrap();
        let b = NewUser::parse(None, "Ada", "ada2@example.com", "r").unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
    }
}
