//! The `hypergen` binary: everything lives in the library.

fn main() -> anyhow::Result<()> {
    hypergen::cli::main()
}
