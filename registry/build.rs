//! Nothing to generate here. The protoc-bin-vendored build dependency exists so
//! that cargo downloads the protoc binary that `tools/protoc` (PROTOC in
//! .cargo/config.toml) runs for etcd-client's build script.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(err) = protoc_bin_vendored::protoc_bin_path() {
        println!("cargo:warning=no vendored protoc for this platform ({err}); set PROTOC");
    }
}
