//! Standalone monitor binary, used by the crate's integration tests (the agent runs the same
//! code as `canopy shim ...`). Accepts the same arguments, with or without a leading `shim`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match canopy_runtime::ShimArgs::parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("canopy-shim: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = canopy_runtime::run_shim(&parsed) {
        eprintln!("canopy-shim: {e:#}");
        std::process::exit(1);
    }
}
