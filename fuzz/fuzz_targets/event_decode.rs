//! The event decoder on arbitrary records: it never panics, and whatever it
//! decodes is an event that matches its key and re-encodes to itself.
//!
//! The input's first byte splits it: 0 means no key, n > 0 a key of the next
//! `n % 32` bytes; the rest is the value.

#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/domain/mod.rs"]
mod domain;

use domain::UserCreated;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (key, value) = if selector == 0 {
        (None, rest)
    } else {
        let n = (selector as usize % 32).min(rest.len());
        (Some(&rest[..n]), &rest[n..])
    };
    match UserCreated::decode(key, Some(value)) {
        Ok(event) => {
            let own = event.key();
            if let Some(key) = key {
                assert_eq!(key, own.as_bytes(), "decoded with another id's key");
            }
            let again = UserCreated::decode(Some(own.as_bytes()), Some(&event.to_json()))
                .expect("a decoded event re-encodes to a record that decodes");
            assert_eq!(again, event, "re-encoding changed the event");
        }
        Err(e) => {
            // The dead-letter reason is built from it.
            assert!(!e.to_string().is_empty());
        }
    }
});
