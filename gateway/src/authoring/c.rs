//! C plugins: the bindings C code needs, generated from the WIT contract,
//! and the step that turns the core module a C compiler makes into a
//! component the gateway loads.
//!
//! A C plugin is compiled by clang for `wasm32-wasi` (WASI preview 1, as
//! Debian's wasi-libc provides it) as a reactor (`-mexec-model=reactor`:
//! no `main`), linked with the generated `plugin_component_type.o`, which
//! carries the component type of the `resumable-plugin` world. The result
//! is a core module; [`componentize`] wraps it into a component, adapting
//! its WASI preview 1 imports to WASI 0.2 with the preview 1 adapter that
//! matches the gateway's wasmtime.

use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
};

use super::{AuthoringError, WIT, WORLD};

/// The C bindings of the contract: `plugin.h`, `plugin.c` and
/// `plugin_component_type.o`, as (file name, contents).
pub fn bindings() -> Result<Vec<(String, Vec<u8>)>, AuthoringError> {
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve
        .push_source("plugin.wit", WIT)
        .map_err(AuthoringError::Bindings)?;
    let world = resolve
        .select_world(&[package], Some(WORLD))
        .map_err(AuthoringError::Bindings)?;
    let mut files = wit_bindgen_core::Files::default();
    let opts = wit_bindgen_c::Opts {
        rename_world: Some("plugin".into()),
        ..Default::default()
    };
    opts.build()
        .generate(&mut resolve, world, &mut files)
        .map_err(AuthoringError::Bindings)?;
    Ok(files
        .iter()
        .map(|(name, bytes)| (name.to_owned(), bytes.to_vec()))
        .collect())
}

/// Turns `core`, a core module built with the bindings of [`bindings`],
/// into a plugin component. Errors name what is wrong (a missing export, an
/// import the contract does not offer).
pub fn componentize(core: &[u8]) -> Result<Vec<u8>, AuthoringError> {
    wit_component::ComponentEncoder::default()
        .module(core)
        .and_then(|e| {
            e.validate(true).adapter(
                WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
                WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
            )
        })
        .and_then(|mut e| e.encode())
        .map_err(AuthoringError::Componentize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_declare_the_handler_exports_and_the_host_imports() {
        let files = bindings().expect("bindings");
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"plugin.h"), "{names:?}");
        assert!(names.contains(&"plugin.c"), "{names:?}");
        assert!(names.contains(&"plugin_component_type.o"), "{names:?}");
        let header = files
            .iter()
            .find(|(n, _)| n == "plugin.h")
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        assert!(
            header.contains("exports_wasmgate_plugin_handler_on_message"),
            "{header}"
        );
        assert!(header.contains("wasmgate_plugin_host_send"), "{header}");
    }

    #[test]
    fn componentize_refuses_a_module_that_is_not_a_plugin_with_a_reason() {
        // A module importing a function the contract does not offer:
        // (module (import "env" "nope" (func))).
        let module = [
            0, b'a', b's', b'm', 1, 0, 0, 0, // header
            1, 4, 1, 0x60, 0, 0, // type section: () -> ()
            2, 12, 1, 3, b'e', b'n', b'v', 4, b'n', b'o', b'p', b'e', 0, 0, // import
        ];
        let e = componentize(&module).expect_err("an unknown import");
        assert!(e.to_string().contains("env"), "{e}");
        let e = componentize(b"not wasm").expect_err("not wasm");
        assert!(!e.to_string().is_empty());
    }
}
