//! `wasmgate new NAME --lang rust|js|python|c`: a plugin project that
//! builds and serves as it is.
//!
//! Every project has the same shape, whatever its language:
//!
//! ```text
//! NAME/
//!   src/          the handler: a working echo (the repository's own echo
//!                 example in that language)
//!   sdk/LANG/     that language's SDK, as this wasmgate ships it
//!   wit/          the contract this wasmgate serves
//!   build.sh      builds NAME.wasm
//!   gateway.toml  serves NAME.wasm at ws://127.0.0.1:8080/NAME
//!   README.md     the loop: build, serve, connect
//! ```
//!
//! Everything is embedded in the binary, so a project is made offline and
//! matches the gateway that made it; the build installs the language's
//! pinned toolchain on first use (crates.io, npm or PyPI), or needs clang
//! for C.

use std::path::{Path, PathBuf};

use super::{AuthoringError, WIT};

/// A guest language `wasmgate new` can scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with the `wasmgate-sdk` crate.
    Rust,
    /// JavaScript, with componentize-js.
    Js,
    /// Python, with componentize-py.
    Python,
    /// C, with clang and `wasmgate componentize`.
    C,
}

/// A file of a project: its path inside the project, its contents, and
/// whether it is executable.
struct File {
    path: String,
    contents: Vec<u8>,
    executable: bool,
}

fn file(path: impl Into<String>, contents: impl AsRef<[u8]>) -> File {
    File {
        path: path.into(),
        contents: contents.as_ref().to_vec(),
        executable: false,
    }
}

fn script(path: impl Into<String>, contents: impl AsRef<[u8]>) -> File {
    File {
        executable: true,
        ..file(path, contents)
    }
}

/// Whether `name` can be a project: a folder, a route path and a crate
/// name.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The files of project `name` in `lang`. `wasmgate` is the command that
/// made it (for the C build, which calls `wasmgate componentize`).
fn files(name: &str, lang: Lang, wasmgate: &Path) -> Vec<File> {
    let mut files = vec![file("wit/plugin.wit", WIT)];
    let isolation = match lang {
        // Megabytes per instance: one instance for the route.
        Lang::Js | Lang::Python => "shared",
        Lang::Rust | Lang::C => "connection",
    };
    files.push(file(
        "gateway.toml",
        format!(
            "# Serves {name}.wasm (built by ./build.sh) at ws://127.0.0.1:8080/{name}.\n\
             # Run: wasmgate serve --config gateway.toml\n\
             # Edit and rebuild while it runs: the new version is served without a restart.\n\n\
             [server]\nlisten = \"127.0.0.1:8080\"\n\n\
             [[route]]\npath = \"/{name}\"\nplugin = \"{name}.wasm\"\nisolation = \"{isolation}\"\n"
        ),
    ));
    let (build, lang_name, sdk_readme) = match lang {
        Lang::Rust => {
            let crate_name = name.replace('-', "_");
            files.push(file(
                "Cargo.toml",
                format!(
                    "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
                     [lib]\ncrate-type = [\"cdylib\"]\n\n\
                     [dependencies]\nwasmgate-sdk = {{ path = \"sdk/rust\" }}\n\n\
                     [profile.release]\nopt-level = \"s\"\nlto = true\ncodegen-units = 1\nstrip = true\npanic = \"abort\"\n\n\
                     # A workspace of its own, wherever the project lives.\n[workspace]\n"
                ),
            ));
            files.push(file(
                "sdk/rust/Cargo.toml",
                "[package]\nname = \"wasmgate-sdk\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
                 [dependencies]\nwit-bindgen = { version = \"0.57\", default-features = false, features = [\"macros\", \"realloc\"] }\n\
                 serde = { version = \"1\", features = [\"derive\"] }\nserde_json = \"1\"\n",
            ));
            // The SDK finds the contract at ../wit from its crate: the
            // project's wit/ is ../../wit from sdk/rust.
            files.push(file(
                "sdk/rust/src/lib.rs",
                include_str!("../../../sdk/src/lib.rs")
                    .replace("path: \"../wit\"", "path: \"../../wit\""),
            ));
            files.push(file(
                "src/lib.rs",
                include_str!("../../../plugins/echo/src/lib.rs"),
            ));
            (
                format!(
                    "#!/usr/bin/env bash\n# Builds {name}.wasm from src/lib.rs.\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n\
                     rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2\n\
                     cargo build --release --target wasm32-wasip2\n\
                     cp target/wasm32-wasip2/release/{crate_name}.wasm {name}.wasm.tmp\nmv {name}.wasm.tmp {name}.wasm\necho {name}.wasm\n"
                ),
                "Rust",
                None,
            )
        }
        Lang::Js => {
            for (path, contents) in [
                (
                    "sdk/js/wasmgate.js",
                    include_str!("../../../sdk/js/wasmgate.js"),
                ),
                (
                    "sdk/js/index.d.ts",
                    include_str!("../../../sdk/js/index.d.ts"),
                ),
                (
                    "sdk/js/package.json",
                    include_str!("../../../sdk/js/package.json"),
                ),
                (
                    "sdk/js/package-lock.json",
                    include_str!("../../../sdk/js/package-lock.json"),
                ),
            ] {
                files.push(file(path, contents));
            }
            files.push(script(
                "sdk/js/build.sh",
                include_str!("../../../sdk/js/build.sh"),
            ));
            files.push(file(
                "src/plugin.js",
                include_str!("../../../plugins/echo-js/plugin.js"),
            ));
            (
                format!(
                    "#!/usr/bin/env bash\n# Builds {name}.wasm from src/plugin.js (the first build installs the pinned\n# componentize-js from npm into target/toolchains/js, or $WASMGATE_TOOLCHAINS/js).\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n\
                     sdk/js/build.sh src {name}.wasm\n"
                ),
                "JavaScript",
                Some(("sdk/js/README.md", include_str!("../../../sdk/js/README.md"))),
            )
        }
        Lang::Python => {
            for (path, contents) in [
                (
                    "sdk/python/wasmgate/__init__.py",
                    include_str!("../../../sdk/python/wasmgate/__init__.py"),
                ),
                (
                    "sdk/python/wasmgate/_component.py",
                    include_str!("../../../sdk/python/wasmgate/_component.py"),
                ),
                (
                    "sdk/python/wasmgate/_host.py",
                    include_str!("../../../sdk/python/wasmgate/_host.py"),
                ),
                (
                    "sdk/python/wasmgate/log.py",
                    include_str!("../../../sdk/python/wasmgate/log.py"),
                ),
                (
                    "sdk/python/requirements.txt",
                    include_str!("../../../sdk/python/requirements.txt"),
                ),
            ] {
                files.push(file(path, contents));
            }
            files.push(script(
                "sdk/python/build.sh",
                include_str!("../../../sdk/python/build.sh"),
            ));
            files.push(file(
                "src/app.py",
                include_str!("../../../plugins/echo-py/app.py"),
            ));
            (
                format!(
                    "#!/usr/bin/env bash\n# Builds {name}.wasm from src/app.py (the first build installs the pinned\n# componentize-py from PyPI into target/toolchains/python, or\n# $WASMGATE_TOOLCHAINS/python).\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n\
                     sdk/python/build.sh src {name}.wasm\n"
                ),
                "Python",
                Some(("sdk/python/README.md", include_str!("../../../sdk/python/README.md"))),
            )
        }
        Lang::C => {
            files.push(file(
                "sdk/c/wasmgate.h",
                include_str!("../../../sdk/c/wasmgate.h"),
            ));
            files.push(file(
                "sdk/c/wasmgate.c",
                include_str!("../../../sdk/c/wasmgate.c"),
            ));
            files.push(script(
                "sdk/c/build.sh",
                include_str!("../../../sdk/c/build.sh"),
            ));
            files.push(file(
                "src/plugin.c",
                include_str!("../../../plugins/echo-c/plugin.c"),
            ));
            (
                format!(
                    "#!/usr/bin/env bash\n# Builds {name}.wasm from src/*.c with clang (Debian: clang lld wasi-libc\n# libclang-rt-14-dev-wasm32) and `wasmgate componentize`.\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n\
                     WASMGATE=$(command -v wasmgate || echo {wasmgate:?})\n\
                     sdk/c/build.sh src {name}.wasm \"$WASMGATE\"\n",
                    wasmgate = wasmgate.display().to_string()
                ),
                "C",
                Some(("sdk/c/README.md", include_str!("../../../sdk/c/README.md"))),
            )
        }
    };
    files.push(script("build.sh", build));
    if let Some((path, contents)) = sdk_readme {
        files.push(file(path, contents));
    }
    let source = match lang {
        Lang::Rust => "src/lib.rs",
        Lang::Js => "src/plugin.js",
        Lang::Python => "src/app.py",
        Lang::C => "src/plugin.c",
    };
    files.push(file(
        "README.md",
        format!(
            "# {name}\n\nA wasmgate plugin in {lang_name}: an echo handler to start from ({source}).\n\n\
             ```sh\n./build.sh                              # builds {name}.wasm\n\
             wasmgate serve --config gateway.toml    # serves it at ws://127.0.0.1:8080/{name}\n```\n\n\
             Connect with any WebSocket client and send a message: it comes back.\n\
             Change {source}, run ./build.sh again, and the running gateway serves the new\n\
             version to new connections without a restart.\n\n\
             The API is described in the SDK (sdk/), the contract in wit/plugin.wit.\n"
        ),
    ));
    files
}

/// Creates project `name` in `lang` as a new folder `name` under `parent`;
/// returns the folder. `wasmgate` is the path of the running command.
pub fn create(
    parent: &Path,
    name: &str,
    lang: Lang,
    wasmgate: &Path,
) -> Result<PathBuf, AuthoringError> {
    if !valid_name(name) {
        return Err(AuthoringError::BadName(name.to_owned()));
    }
    let root = parent.join(name);
    if root.exists() {
        return Err(AuthoringError::Exists(root));
    }
    for f in files(name, lang, wasmgate) {
        let path = root.join(&f.path);
        let io = |source| AuthoringError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(&path, &f.contents).map_err(io)?;
        #[cfg(unix)]
        if f.executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        }
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_must_be_folder_path_and_crate_names() {
        for ok in ["hello", "chat-2", "my_plugin", "A"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "2fast", "-x", "a/b", "..", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn every_project_has_the_contract_a_config_a_build_script_and_a_handler() {
        for lang in [Lang::Rust, Lang::Js, Lang::Python, Lang::C] {
            let files = files("hello", lang, Path::new("/usr/bin/wasmgate"));
            let has = |p: &str| files.iter().any(|f| f.path == p);
            for p in ["wit/plugin.wit", "gateway.toml", "build.sh", "README.md"] {
                assert!(has(p), "{lang:?}: {p}");
            }
            assert!(files.iter().any(|f| f.path.starts_with("src/")), "{lang:?}");
            let config = files
                .iter()
                .find(|f| f.path == "gateway.toml")
                .map(|f| String::from_utf8_lossy(&f.contents).into_owned())
                .unwrap_or_default();
            assert!(config.contains("path = \"/hello\""), "{config}");
            assert!(config.contains("plugin = \"hello.wasm\""), "{config}");
            assert!(
                crate::config::Config::parse(&config, Path::new("gateway.toml")).is_ok(),
                "{config}"
            );
        }
    }
}
