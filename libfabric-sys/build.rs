//! Generates bindings to the system's libfabric headers and compiles C wrappers for the
//! `static inline` calls (`fi_write`, `fi_cq_read`, `fi_mr_reg`, ...) so Rust can call
//! them. Overrides: `LIBFABRIC_INCLUDE_DIR`, `LIBFABRIC_LIB_DIR`.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBFABRIC_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=LIBFABRIC_LIB_DIR");
    println!("cargo:rerun-if-changed=wrapper.h");
    let include = env::var_os("LIBFABRIC_INCLUDE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    if !include.join("rdma/fabric.h").exists() {
        panic!(
            "libfabric headers not found ({} has no rdma/fabric.h). Install them: \
             `apt-get install libfabric-dev` on Debian/Ubuntu (or run `cargo xtask test`, which \
             does), or point LIBFABRIC_INCLUDE_DIR and LIBFABRIC_LIB_DIR at a libfabric install.",
            include.display()
        );
    }
    if let Some(lib) = env::var_os("LIBFABRIC_LIB_DIR") {
        println!(
            "cargo:rustc-link-search=native={}",
            PathBuf::from(lib).display()
        );
    }
    println!("cargo:rustc-link-lib=fabric");

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let header =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("wrapper.h");
    let wrappers = out.join("fabric_static_fns");
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("fi_.*")
        .allowlist_type("fi_.*|fid_.*|fid")
        .allowlist_var("FI_.*")
        .wrap_static_fns(true)
        .wrap_static_fns_path(&wrappers)
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| panic!("bindgen over {}: {e}", header.display()));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
    cc::Build::new()
        .file(wrappers.with_extension("c"))
        .include(&include)
        .include(header.parent().expect("wrapper.h has a directory"))
        .warnings(false)
        .compile("fabric_static_fns");
}
