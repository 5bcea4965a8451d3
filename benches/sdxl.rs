//! `cargo bench --bench sdxl -- [hypergen bench flags]`: the same benchmark as
//! `hypergen bench` (see `benches/README.md`), e.g.
//! `cargo bench --bench sdxl -- --device wgpu --dtype float16 --size 512,1024`.
//!
//! Not a libtest harness: the timing lives in `hypergen::app::bench`. `cargo test` builds and
//! runs this target without `--bench`; it then does nothing.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("benches/sdxl.rs: run with `cargo bench --bench sdxl -- [flags]`");
        return Ok(());
    }
    let flags = args.into_iter().filter(|a| a != "--bench");
    let argv = ["hypergen".to_string(), "bench".to_string()]
        .into_iter()
        .chain(flags);
    hypergen::app::cli::run(hypergen::app::cli::Cli::parse_from(argv))
}
