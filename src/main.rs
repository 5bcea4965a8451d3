//! The `hypergen` binary: the application lives in `hypergen::app`.

fn main() -> anyhow::Result<()> {
    hypergen::app::cli::main()
}
