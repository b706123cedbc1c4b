//! Properties of parsing that the projector relies on, and of parsing
//! anything at all that a caller or the log may hand us:
//!
//! - a parse is idempotent: whatever `parse` returns, parsing its text again
//!   returns the same value (the projector re-parses every event);
//! - every command the command side accepts becomes an event the projector
//!   decodes back to the same event, instead of dead-lettering it;
//! - the event decoder is total: arbitrary bytes, JSON of the wrong shape and
//!   mutated or truncated encodings never panic, and give either an event
//!   that re-encodes to itself or a typed [`EventDecodeError`];
//! - validation is total: arbitrary text and ids never panic; an accepted
//!   command is a fixed point; a rejected one names exactly the fields that
//!   fail on their own;
//! - a request id is accepted exactly when it is 1 to 128 visible ASCII
//!   characters, kept byte for byte, and always derives an id in range.
//!
//! The strings are built from pieces chosen to hit Unicode corners (case
//! mappings that change length or add combining marks, compatibility and
//! full-width forms, ignorable and joiner characters, right-to-left letters,
//! Punycode prefixes, characters that map to `.` or to white space) as well
//! as from arbitrary characters and bytes.

use super::{
    EventDecodeError, NewUser, RequestId, SCHEMA_VERSION, User, UserCreated, UserId, UserName, ids,
};
use crate::domain::Email;
use crate::domain::user::{EMAIL_LOCAL_MAX_LEN, EMAIL_MAX_LEN, NAME_MAX_CHARS, REQUEST_ID_MAX_LEN};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Map, Value, json};

/// Enough to find the corners the pieces aim at, few enough that
/// `cargo test --lib domain` stays at a few seconds.
const CASES: u32 = 2000;

/// For the suites on hostile input below: each case is cheap, but there are
/// several suites and CI has two cores.
const HOSTILE_CASES: u32 = 512;

fn config() -> ProptestConfig {
    config_with(CASES)
}

fn config_with(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // A failure prints its minimal counterexample; keep it as a unit test
        // in user.rs rather than in a regressions file.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Pieces of words with a history of breaking normalisation.
const WORD_PIECES: &[&str] = &[
    "a",
    "Z",
    "0",
    "-",
    "İ",        // U+0130: lower-cases to i + U+0307
    "ı",        // U+0131 dotless i
    "ß",        // UTS #46 keeps it (nontransitional); upper-cases to SS
    "ẞ",        // U+1E9E capital sharp s
    "ς",        // final sigma
    "Σ",        //
    "\u{301}",  // combining acute
    "\u{307}",  // combining dot above
    "\u{323}",  // combining dot below (reorders with U+0307)
    "\u{345}",  // combining ypogegrammeni (case folds to ι)
    "e\u{301}", // decomposed é
    "é",        // composed é
    "ｆ",       // full-width letters
    "Ａ",       //
    "\u{ad}",   // soft hyphen: ignored by UTS #46
    "\u{200b}", // zero width space
    "\u{200c}", // zero width non-joiner
    "\u{200d}", // zero width joiner
    "\u{feff}", // zero width no-break space
    "\u{fb01}", // ﬁ ligature
    "\u{212a}", // Kelvin sign: NFC maps it to K
    "\u{2126}", // Ohm sign: NFC maps it to Ω
    "\u{958}",  // Devanagari qa: NFC decomposes it
    "\u{1100}", // Hangul choseong kiyeok + ...
    "\u{1161}", // ... jungseong a compose to 가
    "가",
    "ⅻ", // small roman numeral twelve: alphanumeric, UTS #46 maps it to xii
    "א", // Hebrew (right to left: bidi rules in domains)
    "ا", // Arabic
    "١", // Arabic-Indic digit one
    "xn--",
    "XN--",
    "xn--istanbul-o0e",
    "xn--bcher-kva",
    "xn--zz",
    "example",
    "\u{10ffff}",
    "\u{fffd}",
];

/// Pieces that separate, or that may not appear in some fields.
const SEPARATOR_PIECES: &[&str] = &[
    ".", "@", " ", "\t", "\n", "\u{7f}", "＠",       // full-width commercial at
    "．",       // full-width full stop
    "。",       // ideographic full stop: UTS #46 maps it to '.'
    "\u{ff61}", // halfwidth ideographic full stop: also '.'
    "\u{a0}",   // no-break space
    "\u{3000}", // ideographic space
    "\u{2003}", // em space
    ".com",
];

/// Mostly word pieces, now and then a separator or any character at all.
fn piece(separators: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::sample::select(WORD_PIECES).prop_map(str::to_owned),
        separators => proptest::sample::select(SEPARATOR_PIECES).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ]
}

/// A run of `min..=max` pieces.
fn pieces(min: usize, max: usize, separators: u32) -> impl Strategy<Value = String> {
    proptest::collection::vec(piece(separators), min..=max).prop_map(|v| v.concat())
}

/// Text to try as a name: arbitrary strings and runs of pieces.
fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        pieces(0, 12, 3),
        ("[a-zA-Z ]{0,3}", pieces(0, 6, 3)).prop_map(|(a, p)| format!("{a}{p}")),
    ]
}

/// Text to try as an email: arbitrary strings, runs of pieces, and
/// `local@label.label` shapes whose parts are runs of pieces, so that a good
/// share of them parse.
fn email_text() -> impl Strategy<Value = String> {
    let label = || {
        prop_oneof![
            "[a-z0-9]{1,6}",
            pieces(1, 4, 0),
            pieces(1, 4, 1),
            ("[a-z]{1,3}", pieces(1, 3, 0)).prop_map(|(a, p)| format!("{a}{p}")),
        ]
    };
    let shaped = (
        prop_oneof!["[a-zA-Z0-9.+]{1,8}", pieces(1, 5, 0), pieces(1, 5, 1)],
        proptest::collection::vec(label(), 1..=3),
        proptest::sample::select(&[".", "。", "．", "\u{ff61}"][..]),
        prop_oneof![Just("com".to_owned()), "[a-zA-Z]{2,4}", label()],
    )
        .prop_map(|(local, labels, dot, tld)| format!("{local}@{}{dot}{tld}", labels.join(".")));
    prop_oneof![1 => any::<String>(), 1 => pieces(0, 16, 3), 6 => shaped]
}

fn request_id_text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[!-~]{1,128}", any::<String>()]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_parsed_name_parses_to_itself(raw in name_text()) {
        if let Ok(name) = UserName::parse(&raw) {
            prop_assert_eq!(UserName::parse(name.as_str()), Ok(name));
        }
    }

    #[test]
    fn a_parsed_email_parses_to_itself(raw in email_text()) {
        if let Ok(email) = Email::parse(&raw) {
            prop_assert_eq!(Email::parse(email.as_str()), Ok(email));
        }
    }

    #[test]
    fn every_accepted_command_is_an_event_the_projector_applies(
        id in 1..=i64::MAX,
        name in name_text(),
        email in email_text(),
        request_id in request_id_text(),
        created_at_ms in any::<i64>(),
    ) {
        if let Ok(new) = NewUser::parse(Some(id), &name, &email, &request_id) {
            let user = User {
                id: UserId::parse(id).unwrap(),
                name: new.name,
                email: new.email,
                created_at_ms,
            };
            let event = UserCreated::new(user, new.request_id);
            let key = id.to_string();
            let json = event.to_json();
            let decoded = UserCreated::decode(Some(key.as_bytes()), Some(&json));
            prop_assert!(decoded.is_ok(), "projector rejected {:?}: {:?}", event, decoded);
            prop_assert_eq!(decoded.unwrap(), event);
        }
    }

    /// The article's Go service writes any user this service would accept as
    /// `{"id","name","email","create_time"}` (Go's RFC 3339, at nanosecond
    /// precision and in any offset): it decodes to that user, its time to
    /// the millisecond, in the legacy format, naming no request.
    #[test]
    fn the_articles_event_of_any_valid_user_decodes_to_it(
        event in event(),
        ms in -62_135_596_800_000i64..253_402_300_800_000,
        sub_ms_nanos in 0u32..1_000_000,
        offset_minutes in -720i32..=840,
    ) {
        use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};
        let utc = OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(ms) * 1_000_000 + i128::from(sub_ms_nanos),
        )
        .unwrap();
        let local = UtcOffset::from_whole_seconds(offset_minutes * 60).unwrap();
        // Go writes the time in its own zone: only within years 0 to 9999.
        let create_time = match utc.checked_to_offset(local).map(|t| t.format(&Rfc3339)) {
            Some(Ok(t)) => t,
            _ => return Ok(()),
        };
        let json = json!({
            "id": event.user.id.get(),
            "name": event.user.name.as_str(),
            "email": event.user.email.as_str(),
            "create_time": create_time,
        });
        let bytes = serde_json::to_vec(&json).unwrap();
        let decoded = UserCreated::decode_with_format(Some(event.key().as_bytes()), Some(&bytes));
        let mut user = event.user.clone();
        user.created_at_ms = ms;
        prop_assert_eq!(
            decoded.ok(),
            Some((UserCreated::new(user, None), super::EventFormat::Legacy))
        );
    }
}

/// The strategies must produce accepted values often, Punycode domains
/// among them, or the properties above hold vacuously.
#[test]
fn the_strategies_produce_valid_values() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let names = (0..1000)
        .filter(|_| {
            let raw = name_text().new_tree(&mut runner).unwrap().current();
            UserName::parse(&raw).is_ok()
        })
        .count();
    let emails: Vec<Email> = (0..1000)
        .filter_map(|_| {
            let raw = email_text().new_tree(&mut runner).unwrap().current();
            Email::parse(&raw).ok()
        })
        .collect();
    let punycode = emails
        .iter()
        .filter(|e| e.as_str().contains("xn--"))
        .count();
    assert!(names > 300, "only {names} of 1000 names parse");
    assert!(
        emails.len() > 150,
        "only {} of 1000 emails parse",
        emails.len()
    );
    assert!(punycode > 50, "only {punycode} of the emails have Punycode");
}

// ---------------------------------------------------------------------------
// Hostile input: what a caller sends, what another writer (or a corrupted
// record) leaves in the log.
// ---------------------------------------------------------------------------

/// Text as a careless or hostile client sends it: arbitrary strings, UTF-8
/// recovered from arbitrary bytes, nothing but controls and spaces, long runs
/// of one character, names behind a lot of padding.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        pieces(0, 12, 3),
        "[\\x00-\\x1f\\x7f \\u{85}\\u{2028}]{0,8}",
        (any::<char>(), 100usize..2_000).prop_map(|(c, n)| c.to_string().repeat(n)),
        (name_text(), 0usize..300).prop_map(|(t, n)| format!("{}{t}", " ".repeat(n))),
    ]
}

/// Names: hostile text, and often enough one that is accepted.
fn hostile_name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => hostile_text(),
        1 => name_text(),
        1 => "[A-Z][a-z]{0,10}( [A-Z][a-z]{0,10})?",
    ]
}

fn hostile_email() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => email_text(),
        2 => "[a-z0-9.+]{1,10}@[a-z0-9-]{1,10}\\.[a-z]{2,5}",
        2 => hostile_text(),
        // Local parts and domains around their limits.
        1 => (1usize..80, 1usize..260).prop_map(|(l, d)| format!("{}@{}.com", "l".repeat(l), "d".repeat(d))),
    ]
}

/// An id field: absent, any integer, the edges.
fn hostile_id() -> impl Strategy<Value = Option<i64>> {
    proptest::option::of(prop_oneof![
        any::<i64>(),
        Just(0),
        Just(-1),
        Just(1),
        Just(i64::MIN),
        Just(i64::MAX),
    ])
}

/// Request ids: empty, acceptable, too long, UUIDs in their spellings, one
/// bad character among good ones, anything, and very long.
fn hostile_request_id() -> impl Strategy<Value = String> {
    let bad_char = proptest::sample::select(
        &[
            " ", "\t", "\n", "\0", "\u{7f}", "é", "\u{ff0d}", "\u{a0}", "\u{200b}", "\u{fffd}",
        ][..],
    );
    prop_oneof![
        Just(String::new()),
        "[!-~]{1,128}",
        "[!-~]{129,400}",
        Just("r".repeat(REQUEST_ID_MAX_LEN)),
        Just("r".repeat(REQUEST_ID_MAX_LEN + 1)),
        any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).braced().to_string().to_uppercase()),
        any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).urn().to_string()),
        ("[!-~]{0,20}", bad_char, "[!-~]{0,20}").prop_map(|(a, b, c)| format!("{a}{b}{c}")),
        any::<String>(),
        (any::<char>(), 1usize..20_000).prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
}

/// The request-id rule as documented (README "Limits"), written out apart
/// from the implementation.
fn documented_request_id(raw: &str) -> bool {
    (1..=REQUEST_ID_MAX_LEN).contains(&raw.len()) && raw.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn fields(e: &super::ValidationError) -> Vec<&'static str> {
    e.0.iter().map(|v| v.field).collect()
}

proptest! {
    #![proptest_config(config_with(HOSTILE_CASES))]

    #[test]
    fn a_request_id_is_kept_exactly_when_it_is_short_visible_ascii(
        raw in hostile_request_id(),
        attempt in any::<u32>(),
    ) {
        match RequestId::parse(&raw) {
            Ok(None) => prop_assert!(raw.is_empty()),
            Ok(Some(r)) => {
                prop_assert!(documented_request_id(&raw), "accepted {:?}", raw);
                prop_assert_eq!(r.as_str(), raw.as_str());
                let id = ids::assigned_id(&r, attempt).get();
                prop_assert!((ids::ASSIGNED_MIN..=ids::ASSIGNED_MAX).contains(&id));
            }
            Err(e) => {
                prop_assert!(!raw.is_empty() && !documented_request_id(&raw), "refused {:?}", raw);
                prop_assert_eq!(fields(&e), vec!["request_id"]);
            }
        }
    }

    #[test]
    fn validation_is_total_and_names_the_fields_that_fail(
        id in hostile_id(),
        name in hostile_name(),
        email in hostile_email(),
        request_id in hostile_request_id(),
    ) {
        // Each field on its own; the command must report exactly these.
        let failing: Vec<&str> = [
            ("id", id.is_some_and(|id| UserId::parse(id).is_err())),
            ("name", UserName::parse(&name).is_err()),
            ("email", Email::parse(&email).is_err()),
            ("request_id", RequestId::parse(&request_id).is_err()),
        ]
        .into_iter()
        .filter_map(|(field, bad)| bad.then_some(field))
        .collect();
        match NewUser::parse(id, &name, &email, &request_id) {
            Ok(new) => {
                prop_assert!(failing.is_empty());
                // Within the documented limits ...
                prop_assert!(new.id.is_none_or(|id| id.get() > 0));
                let n = new.name.as_str();
                prop_assert!((1..=NAME_MAX_CHARS).contains(&n.chars().count()));
                prop_assert!(!n.chars().any(char::is_control));
                prop_assert_eq!(n.trim(), n);
                let e = new.email.as_str();
                prop_assert!(e.len() <= EMAIL_MAX_LEN);
                let (local, domain) = e.rsplit_once('@').expect("an accepted email has an @");
                prop_assert!((1..=EMAIL_LOCAL_MAX_LEN).contains(&local.len()));
                prop_assert!(domain.is_ascii() && domain.contains('.'));
                // ... and a fixed point: the normalised form parses to itself.
                let again = NewUser::parse(
                    new.id.map(UserId::get),
                    new.name.as_str(),
                    new.email.as_str(),
                    new.request_id.as_ref().map_or("", RequestId::as_str),
                );
                prop_assert_eq!(again, Ok(new));
            }
            Err(e) => {
                prop_assert_eq!(fields(&e), failing);
                let text = e.to_string();
                for v in &e.0 {
                    prop_assert!(!v.description.is_empty());
                    prop_assert!(text.contains(v.field));
                }
            }
        }
    }
}

/// A valid event: fields from the strategies above where they parse, a known
/// good value where they do not, so that no case is thrown away.
fn event() -> impl Strategy<Value = UserCreated> {
    (
        prop_oneof![1..=i64::MAX, Just(1), Just(i64::MAX)],
        name_text(),
        email_text(),
        request_id_text(),
        any::<i64>(),
    )
        .prop_map(|(id, name, email, request_id, created_at_ms)| {
            let user = User {
                id: UserId::parse(id).unwrap(),
                name: UserName::parse(&name).unwrap_or_else(|_| UserName::parse("Ada").unwrap()),
                email: Email::parse(&email)
                    .unwrap_or_else(|_| Email::parse("ada@example.com").unwrap()),
                created_at_ms,
            };
            UserCreated::new(user, RequestId::parse(&request_id).ok().flatten())
        })
}

/// What every successful decode must give: an event of this version whose
/// fields are fixed points of their parsers, which matches the key it came
/// with, and which encodes to bytes that decode to itself.
fn check_decoded(event: &UserCreated, key: Option<&[u8]>) -> Result<(), TestCaseError> {
    prop_assert_eq!(event.schema_version, SCHEMA_VERSION);
    prop_assert_eq!(event.event_type.as_str(), "UserCreated");
    prop_assert!(event.user.id.get() > 0);
    prop_assert_eq!(
        UserName::parse(event.user.name.as_str()),
        Ok(event.user.name.clone())
    );
    prop_assert_eq!(
        Email::parse(event.user.email.as_str()),
        Ok(event.user.email.clone())
    );
    if let Some(r) = &event.request_id {
        prop_assert_eq!(RequestId::parse(r.as_str()), Ok(Some(r.clone())));
    }
    if let Some(key) = key {
        let own = event.key();
        prop_assert_eq!(key, own.as_bytes());
    }
    let again = UserCreated::decode(Some(event.key().as_bytes()), Some(&event.to_json()));
    prop_assert_eq!(again.as_ref().ok(), Some(event), "re-encoded: {:?}", again);
    Ok(())
}

/// What every failed decode must give: a reason for the dead-letter header.
fn check_refused(e: &EventDecodeError, value: Option<&[u8]>) -> Result<(), TestCaseError> {
    prop_assert!(!e.to_string().is_empty());
    if value.is_none_or(<[u8]>::is_empty) {
        prop_assert!(matches!(e, EventDecodeError::Empty), "{:?}", e);
    }
    Ok(())
}

fn check_decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<(), TestCaseError> {
    match UserCreated::decode(key, value) {
        Ok(event) => check_decoded(&event, key),
        Err(e) => check_refused(&e, value),
    }
}

/// A JSON value that may or may not be what a field expects.
fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        proptest::sample::select(
            &[
                0,
                1,
                2,
                -1,
                i64::MAX,
                i64::MIN,
                u32::MAX as i64,
                u32::MAX as i64 + 1
            ][..]
        )
        .prop_map(Value::from),
        hostile_text().prop_map(Value::from),
        Just(json!([])),
        Just(json!({"id": 1})),
    ]
}

/// The event's fields (the article's `create_time` among them), and one no
/// version of the format has.
const FIELDS: [&str; 9] = [
    "schema_version",
    "type",
    "id",
    "name",
    "email",
    "created_at_ms",
    "create_time",
    "request_id",
    "added_later",
];

/// A value for `FIELDS[i]`: of its type (in range or not) or of any type.
fn field_value(i: usize) -> BoxedStrategy<Value> {
    let typed: BoxedStrategy<Value> = match FIELDS[i] {
        "schema_version" => proptest::sample::select(&[0, 1, 2, 3, u32::MAX as i64][..])
            .prop_map(Value::from)
            .boxed(),
        "type" => proptest::sample::select(&["UserCreated", "UserDeleted", "usercreated", ""][..])
            .prop_map(Value::from)
            .boxed(),
        "id" | "created_at_ms" => prop_oneof![
            (1..=i64::MAX).prop_map(Value::from),
            hostile_id().prop_map(|id| id.map_or(Value::Null, Value::from)),
        ]
        .boxed(),
        "create_time" => prop_oneof![
            any::<i64>().prop_map(|ms| super::go_time(ms).map_or(Value::Null, Value::from)),
            proptest::sample::select(
                &[
                    "2025-11-25T13:40:00Z",
                    "2025-11-25T21:40:00.5+08:00",
                    "2025-11-25T13:40:00.123456789012Z",
                    "2025-11-25 13:40:00Z",
                    "2025-11-25T13:40:60Z",
                    "0000-01-01T00:00:00-00:01",
                    "",
                ][..]
            )
            .prop_map(Value::from),
        ]
        .boxed(),
        "name" => hostile_name().prop_map(Value::from).boxed(),
        "email" => hostile_email().prop_map(Value::from).boxed(),
        _ => hostile_request_id().prop_map(Value::from).boxed(),
    };
    prop_oneof![typed, json_value()].boxed()
}

/// A valid event's JSON with a few fields replaced by other values (of the
/// right type or not) and a few removed.
fn event_shaped_json() -> impl Strategy<Value = (UserCreated, Vec<u8>)> {
    let replacement = (0..FIELDS.len()).prop_flat_map(|i| (Just(i), field_value(i)));
    (
        event(),
        proptest::collection::vec(replacement, 0..4),
        proptest::collection::vec(0..FIELDS.len(), 0..3),
    )
        .prop_map(|(event, replace, remove)| {
            let mut map: Map<String, Value> = serde_json::from_slice(&event.to_json()).unwrap();
            for (i, v) in replace {
                map.insert(FIELDS[i].to_owned(), v);
            }
            for i in remove {
                map.remove(FIELDS[i]);
            }
            let json = serde_json::to_vec(&map).unwrap();
            (event, json)
        })
}

/// One edit of an encoded event's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(Index),
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    /// Writes a byte that means something to JSON or to UTF-8.
    Poke(Index, u8),
    /// Repeats a stretch of the bytes elsewhere.
    Splice(Index, Index, Index),
}

impl Mutation {
    fn apply(&self, b: &mut Vec<u8>) {
        if b.is_empty() {
            return;
        }
        match *self {
            Self::Truncate(ref at) => b.truncate(at.index(b.len())),
            Self::Flip(ref at, mask) => {
                let i = at.index(b.len());
                b[i] ^= mask.max(1);
            }
            Self::Insert(ref at, byte) => b.insert(at.index(b.len() + 1), byte),
            Self::Delete(ref at) => {
                b.remove(at.index(b.len()));
            }
            Self::Poke(ref at, byte) => {
                let i = at.index(b.len());
                b[i] = byte;
            }
            Self::Splice(ref from, ref len, ref to) => {
                let start = from.index(b.len());
                let end = start + len.index(b.len() - start + 1);
                let piece = b[start..end].to_vec();
                let at = to.index(b.len() + 1);
                b.splice(at..at, piece);
            }
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    const POKES: &[u8] = b"\"\\{}[],:0129-+eE. \x00\x7f\x80\xbf\xc3\xed\xf4\xff";
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        (any::<Index>(), proptest::sample::select(POKES)).prop_map(|(i, b)| Mutation::Poke(i, b)),
        (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(f, l, t)| Mutation::Splice(f, l, t)),
    ]
}

/// A record key to go with `event`: none, its own, its own spelled another
/// way, any bytes (UTF-8 or not).
fn key_for(event: &UserCreated) -> impl Strategy<Value = Option<Vec<u8>>> + use<> {
    let own = event.key();
    let respelled = vec![
        format!("0{own}"),
        format!("+{own}"),
        format!("{own} "),
        format!("{own}\0"),
    ];
    prop_oneof![
        1 => Just(None),
        2 => Just(Some(own.into_bytes())),
        1 => proptest::sample::select(respelled).prop_map(|k| Some(k.into_bytes())),
        1 => proptest::collection::vec(any::<u8>(), 0..24).prop_map(Some),
    ]
}

/// Written out by hand, so the order differs from the writer's: the fields
/// of `map` in reverse.
fn reversed_json(map: &Map<String, Value>) -> Vec<u8> {
    let fields: Vec<String> = map
        .iter()
        .rev()
        .map(|(k, v)| format!("{}: {v}", Value::from(k.as_str())))
        .collect();
    format!("{{ {} }}", fields.join(", ")).into_bytes()
}

proptest! {
    #![proptest_config(config_with(HOSTILE_CASES))]

    #[test]
    fn the_decoder_is_total_on_arbitrary_bytes(
        key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24)),
        value in proptest::option::of(prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            any::<String>().prop_map(String::into_bytes),
            hostile_text().prop_map(|t| format!("{{\"{t}\": {t:?}}}").into_bytes()),
        ]),
    ) {
        check_decode(key.as_deref(), value.as_deref())?;
    }

    #[test]
    fn the_decoder_is_total_on_json_of_the_wrong_shape(
        (json, key) in event_shaped_json().prop_flat_map(|(event, json)| (Just(json), key_for(&event))),
    ) {
        check_decode(key.as_deref(), Some(&json))?;
    }

    #[test]
    fn every_event_decodes_to_itself(
        event in event(),
        other_id in any::<i64>(),
        added_later in json_value(),
    ) {
        let key = event.key();
        let json = event.to_json();
        let decoded = UserCreated::decode(Some(key.as_bytes()), Some(&json));
        prop_assert_eq!(decoded.as_ref().ok(), Some(&event), "{:?}", decoded);
        prop_assert_eq!(UserCreated::decode(None, Some(&json)).ok(), Some(event.clone()));
        // Readers ignore fields they do not know, and the order of fields.
        let mut map: Map<String, Value> = serde_json::from_slice(&json).unwrap();
        map.insert("added_later".to_owned(), added_later);
        for bytes in [serde_json::to_vec_pretty(&map).unwrap(), reversed_json(&map)] {
            let decoded = UserCreated::decode(Some(key.as_bytes()), Some(&bytes));
            prop_assert_eq!(decoded.as_ref().ok(), Some(&event), "{:?}", decoded);
        }
        // A key naming another id is refused.
        if other_id != event.user.id.get() {
            let other = other_id.to_string();
            let decoded = UserCreated::decode(Some(other.as_bytes()), Some(&json));
            prop_assert!(matches!(decoded, Err(EventDecodeError::KeyMismatch { .. })), "{:?}", decoded);
        }
    }

    #[test]
    fn a_truncated_encoding_is_refused(event in event(), cut in any::<Index>()) {
        let json = event.to_json();
        let short = &json[..cut.index(json.len())];
        let decoded = UserCreated::decode(Some(event.key().as_bytes()), Some(short));
        if short.is_empty() {
            prop_assert!(matches!(decoded, Err(EventDecodeError::Empty)), "{:?}", decoded);
        } else {
            prop_assert!(matches!(decoded, Err(EventDecodeError::Malformed(_))), "{:?}", decoded);
        }
    }

    #[test]
    fn a_mutated_encoding_decodes_to_a_valid_event_or_is_refused(
        (event, key) in event().prop_flat_map(|e| (Just(e.clone()), key_for(&e))),
        mutations in proptest::collection::vec(mutation(), 1..=3),
    ) {
        let mut bytes = event.to_json();
        for m in &mutations {
            m.apply(&mut bytes);
        }
        check_decode(key.as_deref(), Some(&bytes))?;
    }
}

/// The mutations must leave some records decodable (a name or email changed
/// into another valid one), or the property above only ever sees refusals.
#[test]
fn some_mutated_encodings_still_decode() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = (event(), proptest::collection::vec(mutation(), 1..=3));
    let decoded = (0..1000)
        .filter(|_| {
            let (event, mutations) = strategy.new_tree(&mut runner).unwrap().current();
            let mut bytes = event.to_json();
            mutations.iter().for_each(|m| m.apply(&mut bytes));
            UserCreated::decode(None, Some(&bytes)).is_ok_and(|d| d != event)
        })
        .count();
    assert!(
        decoded > 20,
        "only {decoded} of 1000 mutated encodings decode to another event"
    );
}

/// A record built to exhaust the projector's stack: serde_json refuses
/// nesting deeper than 128 levels where it builds a value, and skips an
/// unknown field's value without recursing, so a deep unknown field is
/// ignored like any other.
#[test]
fn deeply_nested_json_does_not_overflow_the_stack() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let event = UserCreated::new(
        User {
            id: UserId::parse(7).unwrap(),
            name: UserName::parse("Ada").unwrap(),
            email: Email::parse("ada@example.com").unwrap(),
            created_at_ms: 0,
        },
        None,
    );
    let good = String::from_utf8(event.to_json()).unwrap();
    for value in [deep.clone(), good.replacen("\"Ada\"", &deep, 1)] {
        let decoded = UserCreated::decode(None, Some(value.as_bytes()));
        assert!(
            matches!(decoded, Err(EventDecodeError::Malformed(_))),
            "{decoded:?}"
        );
    }
    let added = good.replacen('{', &format!("{{\"added_later\": {deep}, "), 1);
    assert_eq!(
        UserCreated::decode(None, Some(added.as_bytes())).unwrap(),
        event
    );
}

/// Two readers of one log must agree on a record with a field twice (Go's
/// encoding/json keeps the last, other readers the first): refused, and so
/// dead-lettered on every replay.
#[test]
fn a_field_given_twice_is_refused() {
    for dup in [
        r#"{"schema_version":1,"type":"UserCreated","id":7,"id":8,"name":"A","email":"a@example.com","created_at_ms":0}"#,
        r#"{"schema_version":1,"type":"UserCreated","id":7,"name":"A","name":"B","email":"a@example.com","created_at_ms":0}"#,
    ] {
        let decoded = UserCreated::decode(None, Some(dup.as_bytes()));
        assert!(
            matches!(decoded, Err(EventDecodeError::Malformed(_))),
            "{decoded:?}"
        );
    }
}

/// The hostile strategies must reach every outcome often enough, or the
/// properties on them hold vacuously: accepted commands (for the fixed
/// point), and each kind of decode result.
#[test]
fn the_hostile_strategies_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeMap;
    let mut runner = TestRunner::deterministic();
    let command = (
        hostile_id(),
        hostile_name(),
        hostile_email(),
        hostile_request_id(),
    );
    let accepted = (0..1000)
        .filter(|_| {
            let (id, name, email, request_id) = command.new_tree(&mut runner).unwrap().current();
            NewUser::parse(id, &name, &email, &request_id).is_ok()
        })
        .count();
    assert!(
        accepted > 50,
        "only {accepted} of 1000 commands are accepted"
    );
    let mut outcomes = BTreeMap::<&str, usize>::new();
    for _ in 0..1000 {
        let (event, json) = event_shaped_json().new_tree(&mut runner).unwrap().current();
        let outcome = match UserCreated::decode(Some(event.key().as_bytes()), Some(&json)) {
            Ok(_) => "decoded",
            Err(EventDecodeError::Empty) => "empty",
            Err(EventDecodeError::Malformed(_)) => "malformed",
            Err(EventDecodeError::UnsupportedVersion(_)) => "version",
            Err(EventDecodeError::UnknownType(_)) => "type",
            Err(EventDecodeError::KeyMismatch { .. }) => "key",
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    for outcome in ["decoded", "malformed", "version", "type", "key"] {
        let n = outcomes.get(outcome).copied().unwrap_or(0);
        assert!(n >= 10, "{outcome}: {n} of 1000 ({outcomes:?})");
    }
}
