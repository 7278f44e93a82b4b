//! `wasmgate check` and `wasmgate serve` refuse bad configs and bad plugins
//! with errors that name the file, the line or route, and the reason.

use std::process::Command;

use crate::support::*;

fn check(name: &str, config: &str, files: &[(&str, &[u8])]) -> (bool, String) {
    let dir = scratch(name);
    for (f, bytes) in files {
        std::fs::write(dir.join(f), bytes).unwrap();
    }
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config.replace("{testkit}", &plugin("testkit"))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["check", file.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_good_config() {
    let (ok, err) = check(
        "cfg-good",
        "[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n",
        &[],
    );
    assert!(ok, "{err}");
}

#[test]
fn unknown_keys_and_bad_values_name_the_file_line_and_key() {
    let (ok, err) = check(
        "cfg-key",
        "[server]\nlisten = \"127.0.0.1:1\"\nmax_conections = 5\n",
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("gateway.toml:3:") && err.contains("max_conections"),
        "{err}"
    );

    let (ok, err) = check("cfg-value", "[server]\nlisten = \"nowhere\"\n", &[]);
    assert!(!ok);
    assert!(err.contains("gateway.toml:2:"), "{err}");

    let (ok, err) = check(
        "cfg-dur",
        "[[route]]\npath = \"/t\"\nplugin = \"x\"\nidle_timeout = \"forever\"\n",
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("gateway.toml:4:") && err.contains("invalid duration"),
        "{err}"
    );
}

#[test]
fn bad_plugins_are_reported_per_route_with_the_reason() {
    let config = "[[route]]\npath = \"/missing\"\nplugin = \"missing.wasm\"\n\n\
                  [[route]]\npath = \"/garbage\"\nplugin = \"garbage.wasm\"\n\n\
                  [[route]]\npath = \"/core\"\nplugin = \"core.wasm\"\n\n\
                  [[route]]\npath = \"/empty\"\nplugin = \"empty.wasm\"\n\n\
                  [[route]]\npath = \"/builtin\"\nplugin = \"builtin:nope\"\n\n\
                  [[route]]\npath = \"/fine\"\nplugin = \"{testkit}\"\n";
    let files: &[(&str, &[u8])] = &[
        ("garbage.wasm", b"not wasm at all"),
        ("core.wasm", b"\0asm\x01\0\0\0"),
        // A valid component that exports nothing.
        ("empty.wasm", b"\0asm\x0d\0\x01\0"),
    ];
    let (ok, err) = check("cfg-plugins", config, files);
    assert!(!ok);
    let line = |route: &str| {
        err.lines()
            .find(|l| l.contains(&format!("route {route}:")))
            .unwrap_or_else(|| panic!("no error for {route}:\n{err}"))
            .to_owned()
    };
    assert!(line("/missing").contains("missing.wasm") && line("/missing").contains("cannot read"));
    assert!(
        line("/garbage").contains("garbage.wasm")
            && line("/garbage").contains("not a valid component")
    );
    assert!(line("/core").contains("core WebAssembly module, not a component"));
    assert!(
        line("/empty").contains("wasmgate:plugin/handler"),
        "{}",
        line("/empty")
    );
    assert!(line("/builtin").contains("no built-in plugin"));
    assert!(!err.contains("route /fine:"), "{err}");
}

#[test]
fn serve_refuses_to_start_with_a_bad_plugin() {
    let dir = scratch("cfg-serve");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, "[[route]]\npath = \"/x\"\nplugin = \"nope.wasm\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("route /x: plugin") && err.contains("nope.wasm"),
        "{err}"
    );
}
