//! CreateUser's validation on arbitrary fields: it never panics, an accepted
//! command parses to itself from its normalised form, and a refused one
//! names exactly the fields that fail on their own.
//!
//! The input is split at its first two 0xff bytes into name, email and
//! request id (lossy UTF-8, as prost would refuse invalid UTF-8 earlier);
//! the id is the name's length minus 8, so it is sometimes not positive.

#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/domain/mod.rs"]
mod domain;

use domain::{Email, NewUser, RequestId, UserId, UserName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0xff).map(String::from_utf8_lossy);
    let name = parts.next().unwrap_or_default();
    let email = parts.next().unwrap_or_default();
    let request_id = parts.next().unwrap_or_default();
    let id = Some(name.len() as i64 - 8).filter(|_| data.len() % 2 == 0);

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
            assert!(failing.is_empty());
            let again = NewUser::parse(
                new.id.map(UserId::get),
                new.name.as_str(),
                new.email.as_str(),
                new.request_id.as_ref().map_or("", RequestId::as_str),
            );
            assert_eq!(again, Ok(new), "not a fixed point");
        }
        Err(e) => {
            let fields: Vec<&str> = e.0.iter().map(|v| v.field).collect();
            assert_eq!(fields, failing);
        }
    }
});
