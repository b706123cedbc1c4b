//! Value types that parse and validate on construction.
//!
//! Limits (also documented in the proto and README): a name is 1 to 128
//! characters after trimming, with no control characters; an email is one
//! `local@domain` address of at most 254 bytes (local part at most 64,
//! domain with a dot, no spaces); an id is 1 to 2^63-1; a request id is 1 to
//! 128 visible ASCII characters (no spaces).
//!
//! Text is normalised first and validated second, and the value kept is the
//! normalised one: names and emails are put in Unicode NFC, the email's domain
//! through UTS #46 (see [`Email`]). A parse is accepted only if normalising its
//! result again changes nothing, so `parse(v.as_str()) == Ok(v)` for every
//! value `v` a parse returns. That matters because the projector re-parses
//! each event with these same functions (`UserCreated::decode`): whatever the
//! command side accepted, the projector accepts, unchanged.

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46, verify_dns_length};
use serde::{Deserialize, Serialize};
use std::fmt;
use unicode_normalization::{UnicodeNormalization, is_nfc};

/// Longest name accepted, in characters.
pub const NAME_MAX_CHARS: usize = 128;
/// Longest email accepted, in bytes (RFC 5321's path limit).
pub const EMAIL_MAX_LEN: usize = 254;
/// Longest local part (before the `@`) accepted, in bytes (RFC 5321).
pub const EMAIL_LOCAL_MAX_LEN: usize = 64;
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

/// What a field gets when normalising the normalised text would change it
/// again: a corner of Unicode where the checks cannot promise a stable value.
const UNSTABLE: &str = "must not change when normalised again";

/// Runs `normalise` and keeps its result only if it is a fixed point: the
/// value stored is then exactly what a later parse of it (the projector's)
/// returns. `normalise` reports its own violations; an unstable result is
/// reported against `field`.
fn stable(
    raw: &str,
    field: &'static str,
    normalise: impl Fn(&str) -> Result<String, ValidationError>,
) -> Result<String, ValidationError> {
    let once = normalise(raw)?;
    match normalise(&once) {
        Ok(twice) if twice == once => Ok(once),
        Ok(_) => Err(ValidationError::one(field, UNSTABLE)),
        Err(e) => Err(e),
    }
}

/// Unicode NFC, then trimmed of white space at both ends.
fn nfc_trimmed(raw: &str) -> String {
    if is_nfc(raw) {
        raw.trim().to_owned()
    } else {
        raw.nfc().collect::<String>().trim().to_owned()
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

/// A display name: Unicode NFC, trimmed, 1 to [`NAME_MAX_CHARS`] characters
/// (counted after normalising), no control characters.
///
/// Format characters such as U+200D ZERO WIDTH JOINER are allowed: emoji
/// sequences and Persian or Indic names need them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserName(String);

impl UserName {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        stable(raw, "name", Self::normalise).map(Self)
    }

    fn normalise(raw: &str) -> Result<String, ValidationError> {
        let name = nfc_trimmed(raw);
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
        Ok(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An email address, syntactically plausible, in one canonical form:
/// `local@domain` where
///
/// - the local part is kept as given (case-sensitive) after Unicode NFC:
///   1 to [`EMAIL_LOCAL_MAX_LEN`] bytes, no white space, control characters
///   or `@`;
/// - the domain is in its **ASCII form**, the result of UTS #46 ToASCII
///   (`idna` crate; STD3 rules, so only letters, digits and hyphens in
///   labels; DNS lengths verified): case-folded and mapped, non-ASCII labels
///   as Punycode. `x@İstanbul.example` becomes `x@xn--istanbul-o0e.example`,
///   `ada@BÜCHER.example` becomes `ada@xn--bcher-kva.example`. The domain
///   needs a dot and no label may be empty.
///
/// The whole address is at most [`EMAIL_MAX_LEN`] bytes, both as given
/// (trimmed, NFC) and in canonical form.
///
/// Why the ASCII form and not the Unicode one (`idna::domain_to_unicode`):
/// it is the form DNS and SMTP (without SMTPUTF8) use, so the byte limit
/// measures what goes on the wire; an ASCII hostname is a fixed point of NFC
/// and of UTS #46 in every Unicode version, so a projector built against
/// other Unicode tables still parses it to the same value; it passes the
/// previous build's rules too (ASCII letters, digits, `-`, `.`), so an older
/// projector still running during a deploy applies the event instead of
/// dead-lettering it; and no confusable or invisible characters end up in
/// logs or keys. A client that wants to show the Unicode form can convert it
/// with `idna::domain_to_unicode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        stable(raw, "email", Self::normalise).map(Self)
    }

    fn normalise(raw: &str) -> Result<String, ValidationError> {
        let email = nfc_trimmed(raw);
        let err = |d: &str| ValidationError::one("email", d);
        let too_long = || err(&format!("must be at most {EMAIL_MAX_LEN} bytes"));
        let malformed = || err("must look like name@example.com");
        if email.is_empty() {
            return Err(err("must not be empty"));
        }
        if email.len() > EMAIL_MAX_LEN {
            return Err(too_long());
        }
        let Some((local, domain)) = email.rsplit_once('@') else {
            return Err(malformed());
        };
        let bad_char = |c: char| c.is_whitespace() || c.is_control() || c == '@';
        if local.is_empty() || local.len() > EMAIL_LOCAL_MAX_LEN || local.chars().any(bad_char) {
            return Err(malformed());
        }
        // ToASCII fails on characters outside letters, digits and hyphens
        // once mapped (white space, `_`, `@`, ...) and on invalid Punycode.
        let domain = Uts46::new()
            .to_ascii(
                domain.as_bytes(),
                AsciiDenyList::STD3,
                Hyphens::Allow,
                DnsLength::Ignore,
            )
            .map_err(|_| malformed())?;
        let email = format!("{local}@{domain}");
        if email.len() > EMAIL_MAX_LEN {
            return Err(too_long());
        }
        // Checked after the length, to report a long address as too long:
        // no empty label (so no leading, trailing or doubled dot), none
        // longer than 63 bytes, and at least two labels.
        if !verify_dns_length(&domain, false) || !domain.contains('.') {
            return Err(malformed());
        }
        Ok(email)
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
    fn text_is_normalised_before_it_is_checked() {
        // NFC: e + COMBINING ACUTE is é; the local part keeps its case.
        let e = Email::parse(" Ade\u{301}le@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "Ad\u{e9}le@example.com");
        assert_eq!(
            UserName::parse("  Ade\u{301}le\u{2003}").unwrap().as_str(),
            "Ad\u{e9}le"
        );
        // UTS #46: mapped, case-folded, Punycode; full-width letters and
        // ideographic full stops are the same domain.
        assert_eq!(
            Email::parse("ada@BÜCHER.example").unwrap().as_str(),
            "ada@xn--bcher-kva.example"
        );
        assert_eq!(
            Email::parse("ada@ｅｘａｍｐｌｅ。com").unwrap().as_str(),
            "ada@example.com"
        );
        // The canonical form parses to itself.
        let b = Email::parse("ada@xn--bcher-kva.example").unwrap();
        assert_eq!(b, Email::parse("ada@bücher.example").unwrap());
        // Not a domain: white space (also non-ASCII), `_`, a dot too many,
        // invalid Punycode, a label longer than DNS allows.
        for bad in [
            "a@exa mple.com",
            "a@exa\u{a0}mple.com",
            "a@exa\u{3000}mple.com",
            "a@ex_ample.com",
            "a@example.com.",
            "a@example.com。",
            "a@xn--zz.example",
            "a@xn--a.example",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        let long_label = format!("a@{}.com", "l".repeat(64));
        assert!(Email::parse(&long_label).is_err());
        assert!(Email::parse(&format!("a@{}.com", "l".repeat(63))).is_ok());
        // The byte limit holds for the canonical form.
        let at_limit = format!(
            "a@{}.{}.{}.{}.com",
            "l".repeat(63),
            "l".repeat(63),
            "l".repeat(63),
            "l".repeat(56)
        );
        assert_eq!(at_limit.len(), EMAIL_MAX_LEN);
        assert!(Email::parse(&at_limit).is_ok());
        let over = at_limit.replacen('a', "ab", 1);
        assert_eq!(
            Email::parse(&over).unwrap_err().0[0].description,
            "must be at most 254 bytes"
        );
        // Punycode is longer than UTF-8 here: 35 bytes a label as given, 41
        // in canonical form.
        let label = format!("{}ü", "l".repeat(33));
        let grows = format!("a@{}.com", [label.as_str(); 6].join("."));
        assert!(grows.len() <= EMAIL_MAX_LEN);
        assert_eq!(
            Email::parse(&grows).unwrap_err().0[0].description,
            "must be at most 254 bytes"
        );
        let fits = format!("a@{}.com", [label.as_str(); 5].join("."));
        assert!(Email::parse(&fits).unwrap().as_str().len() <= EMAIL_MAX_LEN);
    }

    /// The bug from "The log decides": `İ` (U+0130) lower-cased to
    /// `i` + U+0307 passed CreateUser and was dead-lettered by the projector.
    #[test]
    fn a_dotted_capital_i_in_the_domain_is_accepted_and_projected() {
        use crate::domain::UserCreated;
        let new = NewUser::parse(Some(1453), "Ada", "x@İstanbul.example", "").unwrap();
        assert_eq!(new.email.as_str(), "x@xn--istanbul-o0e.example");
        assert_eq!(
            Email::parse(new.email.as_str()),
            Ok(new.email.clone()),
            "the canonical form parses to itself"
        );
        let user = User {
            id: new.id.unwrap(),
            name: new.name,
            email: new.email,
            created_at_ms: 1_700_000_000_000,
        };
        let event = UserCreated::new(user, None);
        let json = event.to_json();
        let decoded = UserCreated::decode(Some(b"1453"), Some(&json)).unwrap();
        assert_eq!(decoded, event);
    }

    /// What the property tests found in the old code (lower-casing without
    /// normalising): each was accepted once and rejected when parsed again.
    #[test]
    fn what_parse_accepts_parses_to_itself() {
        for raw in ["+@aİ.com", "A@aİ.com", "x@İstanbul.example"] {
            let email = Email::parse(raw).unwrap();
            assert_eq!(Email::parse(email.as_str()), Ok(email.clone()), "{raw:?}");
        }
    }

    #[test]
    fn a_normalisation_that_is_not_a_fixed_point_is_rejected() {
        let grows = |s: &str| Ok::<_, ValidationError>(format!("{s}!"));
        assert_eq!(
            stable("a", "name", grows),
            Err(ValidationError::one("name", UNSTABLE))
        );
        let trims = |s: &str| Ok::<_, ValidationError>(s.trim().to_owned());
        assert_eq!(stable(" a ", "name", trims), Ok("a".to_owned()));
    }

    #[test]
    fn fingerprint_differs_when_fields_differ() {
        let a = NewUser::parse(None, "Ada", "ada@example.com", "r").unwrap();
        let b = NewUser::parse(None, "Ada", "ada2@example.com", "r").unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
    }
}
