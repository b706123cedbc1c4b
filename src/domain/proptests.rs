//! Properties of parsing that the projector relies on:
//!
//! - a parse is idempotent: whatever `parse` returns, parsing its text again
//!   returns the same value (the projector re-parses every event);
//! - every command the command side accepts becomes an event the projector
//!   decodes back to the same event, instead of dead-lettering it.
//!
//! The strings are built from pieces chosen to hit Unicode corners (case
//! mappings that change length or add combining marks, compatibility and
//! full-width forms, ignorable and joiner characters, right-to-left letters,
//! Punycode prefixes, characters that map to `.` or to white space) as well
//! as from arbitrary characters.

use super::{NewUser, User, UserCreated, UserId, UserName};
use crate::domain::Email;
use proptest::prelude::*;

/// Enough to find the corners the pieces aim at, few enough that
/// `cargo test --lib domain` stays at a few seconds.
const CASES: u32 = 2000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
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
