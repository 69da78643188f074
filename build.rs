//! Generates the tvix wire types and gRPC stubs from `protos/` with protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "protos/tvix/castore/protos/castore.proto",
        "protos/tvix/castore/protos/rpc_blobstore.proto",
        "protos/tvix/castore/protos/rpc_directory.proto",
        "protos/tvix/store/protos/pathinfo.proto",
        "protos/tvix/store/protos/rpc_pathinfo.proto",
        "protos/tvix_virtiofsd/cache/v1/cache.proto",
    ];
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .bytes(".")
        .file_descriptor_set_path(out.join("tvix_descriptor.bin"))
        .compile_protos(&protos, &["protos"])?;
    // --version names the target and profile the binary was built for.
    println!(
        "cargo:rustc-env=TVIX_VIRTIOFSD_BUILD={} {}",
        std::env::var("TARGET")?,
        std::env::var("PROFILE")?
    );
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
