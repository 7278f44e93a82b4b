//! Fuzz target `config`: `Config::parse_partial` and `Config::parse`
//! (`config.rs`) on arbitrary text.
//!
//! # Input
//!
//! The text of a `gateway.toml`: the input's longest UTF-8 prefix, named
//! `fuzz.toml` (so the corpus files are ordinary config files).
//!
//! # What is checked
//!
//! - Nothing panics, and parsing is deterministic.
//! - Every error names the file and a line of the text (one holding a
//!   position of the text, from 1 to the number of line feeds plus one),
//!   and says something after `fuzz.toml:LINE: `; errors come in file order.
//! - `parse` and `parse_partial` agree: a config is valid for `parse` exactly
//!   when `parse_partial` gives one with no error, and `parse` reports the
//!   same errors; a refused config has at least one error; `parse_partial`
//!   gives no config only for broken TOML, with that one error.
//! - A valid config has at least one route, each with a path starting with
//!   `/` and a line of the text; its limits are within their documented
//!   bounds; its listen address prints as something that parses back to it.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wasmgate_fuzz::config::{Config, ListenAddr};
use wasmgate_fuzz::error::Error;

/// The name the text goes by in errors.
const FILE: &str = "fuzz.toml";

fuzz_target!(|text: &str| {
    let file = Path::new(FILE);
    let lines = text.bytes().filter(|&b| b == b'\n').count() + 1;
    let (partial, errors) = Config::parse_partial(text, file);
    for e in &errors {
        check_error(e, lines);
    }
    assert!(
        errors.windows(2).all(|w| w[0].line() <= w[1].line()),
        "errors not in file order: {:?}",
        shown(&errors)
    );
    if partial.is_none() {
        assert_eq!(
            errors.len(),
            1,
            "no config without broken TOML: {:?}",
            shown(&errors)
        );
    }

    let (again, errors_again) = Config::parse_partial(text, file);
    assert_eq!(
        again.is_some(),
        partial.is_some(),
        "parse_partial is not deterministic"
    );
    assert_eq!(
        shown(&errors_again),
        shown(&errors),
        "parse_partial is not deterministic"
    );

    let valid_partial = partial.is_some() && errors.is_empty();
    match Config::parse(text, file) {
        Ok(config) => {
            assert!(
                valid_partial,
                "parse accepts what parse_partial refuses: {:?}",
                shown(&errors)
            );
            check_valid(&config, lines);
        }
        Err(refused) => {
            assert!(!valid_partial, "parse refuses what parse_partial accepts");
            assert!(!refused.0.is_empty(), "parse refuses without saying why");
            assert_eq!(
                shown(&refused.0),
                shown(&errors),
                "parse and parse_partial report different errors"
            );
        }
    }
});

/// The errors as `wasmgate check` prints them.
fn shown(errors: &[Error]) -> Vec<String> {
    errors.iter().map(Error::to_string).collect()
}

/// An error names the file and a line of the text, and says something.
fn check_error(e: &Error, lines: usize) {
    let shown = e.to_string();
    let (file, line) = match e {
        Error::Config { file, line, .. } | Error::Located { file, line, .. } => (file, *line),
        other => panic!("not an error about the text: {other}"),
    };
    assert_eq!(file, Path::new(FILE), "{shown}");
    assert!(
        (1..=lines).contains(&line),
        "line {line} of a text of {lines} lines: {shown}"
    );
    let prefix = format!("{FILE}:{line}: ");
    assert!(
        shown.starts_with(&prefix) && shown.len() > prefix.len(),
        "an error reads `{FILE}:LINE: what`: {shown:?}"
    );
}

/// What a valid config promises (docs/config.md).
fn check_valid(config: &Config, lines: usize) {
    assert!(!config.routes.is_empty(), "a valid config routes something");
    for route in &config.routes {
        assert!(route.path.starts_with('/'), "route path {:?}", route.path);
        assert!(
            (1..=lines).contains(&route.line),
            "route line {}",
            route.line
        );
        assert!(route.limits.max_frame_size >= 1 && route.limits.max_message_size >= 1);
    }
    assert!(config.server.max_header_size >= 8 << 10);
    assert!((64 << 10..=4 << 30).contains(&config.sandbox.max_memory));
    let listen = &config.server.listen;
    assert_eq!(
        listen.to_string().parse::<ListenAddr>().as_ref(),
        Ok(listen),
        "the listen address does not print back to itself"
    );
}
