//! `wasmgate check` and `wasmgate serve` refuse bad configs and bad plugins
//! with errors that name the file, the line or route, and the reason.

use std::process::Command;

use crate::support::*;

fn check(name: &str, config: &str, files: &[(&str, &[u8])]) -> (bool, String) {
    let (ok, _, err) = check_output(name, config, files);
    (ok, err)
}

/// Runs `wasmgate serve` with `config` and `args` until it exits (it must
/// fail to start): success, stderr.
fn serve_fails(name: &str, config: &str, args: &[&str]) -> (bool, String) {
    let dir = scratch(name);
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config.replace("{testkit}", &plugin("testkit"))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .env("RUST_LOG", "error")
        .arg("serve")
        .args(args)
        .args(["--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The line numbers of `gateway.toml:N:` errors, in the order printed;
/// every line of `stderr` must be an `error: ` line.
fn error_lines(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .map(|l| {
            let rest = l
                .strip_prefix("error: ")
                .unwrap_or_else(|| panic!("not an error line: {l:?}\n{stderr}"));
            let (_, after) = rest.split_once("gateway.toml:").unwrap_or(("", "0:"));
            after
                .split(':')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .collect()
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
        err.contains("gateway.toml:4: idle_timeout: expected a duration"),
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
        line("/garbage")
            .ends_with("garbage.wasm: not a WebAssembly file (starts with \"not wasm\")"),
        "{}",
        line("/garbage")
    );
    assert!(line("/core").contains("core WebAssembly module, not a component"));
    assert!(
        line("/empty").contains("wasmgate:plugin/handler"),
        "{}",
        line("/empty")
    );
    assert!(line("/builtin").contains("no built-in plugin"));
    assert!(!err.contains("route /fine:"), "{err}");
    // One line per error (wasmtime's errors span several), each at the line
    // of its route's `plugin` key, in file order.
    assert_eq!(error_lines(&err), [3, 7, 11, 15, 19], "{err}");
}

#[test]
fn serve_refuses_to_start_with_a_bad_plugin() {
    let (ok, _, err) = serve_output(
        "cfg-serve",
        "[[route]]\npath = \"/x\"\nplugin = \"nope.wasm\"\n",
        "127.0.0.1:0",
    );
    assert!(!ok);
    assert!(
        err.contains("route /x: plugin") && err.contains("nope.wasm"),
        "{err}"
    );
}

#[test]
fn type_errors_name_the_key_and_the_expected_form() {
    let (ok, err) = check(
        "cfg-types",
        "[server]\nlisten = \"127.0.0.1:1\"\nmax_message_size = true\nmax_connections = \"lots\"\n\n\
         [[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\nslow_consumer = \"kill\"\n\
         allowed_origins = \"https://example.com\"\n[route.config]\ngreeting = 1\n",
        &[],
    );
    assert!(!ok);
    let want = [
        r#"gateway.toml:3: max_message_size: expected a size like "1MiB" or a number of bytes, found a boolean"#,
        r#"gateway.toml:4: max_connections: expected a whole number, found the string "lots""#,
        r#"gateway.toml:9: slow_consumer: expected "close" or "drop", found the string "kill""#,
        r#"gateway.toml:10: allowed_origins: expected a list of origins like ["https://example.com"], found the string "https://example.com""#,
        r#"gateway.toml:12: config.greeting: expected a string (the plugin reads [route.config] values as text), found the number 1"#,
    ];
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), want.len(), "{err}");
    for (line, want) in lines.iter().zip(want) {
        assert!(
            line.starts_with("error: ") && line.ends_with(want),
            "{line}\nwanted {want}"
        );
    }
    assert!(!err.contains("Repr") && !err.contains("usize"), "{err}");
}

#[test]
fn check_reports_every_error_in_file_order_with_plugin_errors_among_them() {
    let config = "[server]\n\
                  max_header_size = \"1KiB\"\n\
                  ping_interval = \"soon\"\n\
                  \n\
                  [[route]]\n\
                  path = \"/a\"\n\
                  plugin = \"missing.wasm\"\n\
                  max_message_size = 0\n\
                  \n\
                  [[route]]\n\
                  path = \"/a\"\n\
                  plugin = \"{testkit}\"\n\
                  \n\
                  [[route]]\n\
                  path = \"/chat/*\"\n\
                  plugin = \"{testkit}\"\n\
                  \n\
                  [[route]]\n\
                  plugin = \"{testkit}\"\n\
                  \n\
                  [[route]]\n\
                  path = \"/garbage\"\n\
                  plugin = \"garbage.wasm\"\n\
                  deliver = \"frames\"\n";
    let files: &[(&str, &[u8])] = &[("garbage.wasm", b"not wasm at all")];
    let (ok, out, err) = check_output("cfg-all", config, files);
    assert!(!ok);
    assert!(!out.contains("ok:"), "{out}");
    // Config errors and the two plugins that cannot load, together.
    assert_eq!(error_lines(&err), [2, 3, 7, 8, 11, 15, 18, 23, 24], "{err}");
    assert!(err.contains("gateway.toml:7: route /a: plugin "), "{err}");
    assert!(
        err.contains("gateway.toml:23: route /garbage: plugin "),
        "{err}"
    );
    assert!(
        err.contains("wildcards ('*')") && err.contains("paths are exact"),
        "{err}"
    );
}

#[test]
fn check_lists_routes_in_file_order() {
    // Six routes: a hash map's order matches the file's once in 720 runs.
    let paths = ["/zeta", "/alpha", "/mid", "/beta", "/omega", "/gamma"];
    let config: String = paths
        .iter()
        .map(|p| format!("[[route]]\npath = \"{p}\"\nplugin = \"builtin:echo\"\n\n"))
        .collect();
    let (ok, out, err) = check_output("cfg-order", &config, &[]);
    assert!(ok, "{err}");
    let want: Vec<String> = paths
        .iter()
        .map(|p| format!("ok: route {p} -> builtin:echo"))
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
}

#[test]
fn listen_takes_host_names_and_says_what_form_it_expects() {
    let route = "[[route]]\npath = \"/t\"\nplugin = \"builtin:echo\"\n";
    let (ok, err) = check(
        "cfg-listen-name",
        &format!("[server]\nlisten = \"localhost:8080\"\n{route}"),
        &[],
    );
    assert!(ok, "{err}");
    let (ok, err) = check(
        "cfg-listen-nohost",
        &format!("[server]\nlisten = \":8080\"\n{route}"),
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains(r#"gateway.toml:2: listen: expected host:port such as "127.0.0.1:8080", "[::1]:8080" or "localhost:8080", found ":8080""#),
        "{err}"
    );
    let (ok, err) = check(
        "cfg-listen-port",
        &format!("[server]\nlisten = \"127.0.0.1:99999\"\n{route}"),
        &[],
    );
    assert!(!ok);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: ")
            && lines[0].ends_with("gateway.toml:2: listen: port 99999 is out of range (0-65535)"),
        "{err}"
    );
}

#[test]
fn serve_resolves_a_host_name_in_listen() {
    let dir = scratch("cfg-serve-localhost");
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"localhost:0\"\n\n[[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\n",
    )
    .unwrap();
    let gw = Gateway::spawn(&["serve", "--config", file.to_str().unwrap()]);
    assert!(gw.addr.ip().is_loopback(), "{}", gw.addr);
    drop(gw);
    let gw = Gateway::spawn(&[
        "serve",
        "--listen",
        "localhost:0",
        "--config",
        file.to_str().unwrap(),
    ]);
    assert!(gw.addr.ip().is_loopback(), "{}", gw.addr);
}

#[test]
fn serve_names_the_listen_key_when_its_host_does_not_resolve() {
    let (ok, err) = serve_fails(
        "cfg-serve-unresolved",
        "[server]\nlisten = \"nohost.invalid:8080\"\n\n[[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\n",
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("error: ")
            && err.contains("gateway.toml:2: listen: cannot resolve host name \"nohost.invalid\""),
        "{err}"
    );
    let (ok, err) = serve_fails(
        "cfg-serve-unresolved-cli",
        "[[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\n",
        &["--listen", "nohost.invalid:0"],
    );
    assert!(!ok);
    assert!(
        err.contains("error: --listen: cannot resolve host name \"nohost.invalid\""),
        "{err}"
    );
    let (ok, err) = serve_fails(
        "cfg-serve-cli-form",
        "[[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\n",
        &["--listen", ":8080"],
    );
    assert!(!ok);
    assert!(err.contains("expected host:port such as"), "{err}");
}

#[test]
fn serve_prints_every_startup_error_with_the_error_prefix() {
    let (ok, err) = serve_fails(
        "cfg-serve-two",
        "[[route]]\npath = \"/x\"\nplugin = \"nope.wasm\"\n\n[[route]]\npath = \"/y\"\nplugin = \"nope2.wasm\"\n",
        &["--listen", "127.0.0.1:0"],
    );
    assert!(!ok);
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("route /")).collect();
    assert_eq!(errors.len(), 2, "{err}");
    assert!(errors.iter().all(|l| l.starts_with("error: ")), "{err}");
}

#[test]
fn documented_bounds_and_wildcard_paths_are_refused() {
    let (ok, err) = check(
        "cfg-bounds",
        "[server]\nmax_header_size = \"1KiB\"\nmax_message_size = 0\nmax_connections = 0\n\
         [sandbox]\nmax_memory = \"1KiB\"\n\
         [[route]]\npath = \"/chat/*\"\nplugin = \"builtin:chat\"\n",
        &[],
    );
    assert!(!ok);
    for want in [
        "gateway.toml:2: max_header_size: must be at least 8KiB, found 1KiB",
        "gateway.toml:3: max_message_size: must be at least 1 byte, found 0",
        "gateway.toml:4: max_connections: must be at least 1, found 0",
        "gateway.toml:6: max_memory: must be between 64KiB and 4GiB, found 1KiB",
        "gateway.toml:8: path: \"/chat/*\" contains '*': paths are exact",
    ] {
        assert!(err.contains(want), "no {want:?} in:\n{err}");
    }
    assert_eq!(error_lines(&err), [2, 3, 4, 6, 8], "{err}");
}

#[test]
fn a_device_or_a_memory_hungry_plugin_is_refused_with_a_reason_naming_the_key() {
    // /dev/zero would never finish reading: refused without reading it.
    let (ok, err) = check(
        "cfg-device",
        "[[route]]\npath = \"/zero\"\nplugin = \"/dev/zero\"\n",
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("gateway.toml:3:") && err.contains("not a regular file"),
        "{err}"
    );
    // A Rust plugin's memory starts above 1 MiB.
    let (ok, err) = check(
        "cfg-small-memory",
        "[sandbox]\nmax_memory = \"1MiB\"\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n",
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("more than [sandbox] max_memory (1024 KiB)"),
        "names the key, not the plugin: {err}"
    );
}
