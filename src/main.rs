//! The `hypergen` binary: the application lives in `hypergen::app`.

/// mimalloc, not the system allocator: see its entry in `Cargo.toml`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    hypergen::app::cli::main()
}
