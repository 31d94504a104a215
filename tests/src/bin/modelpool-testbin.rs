//! `modelpool` under another name, for the tests (see Cargo.toml).

fn main() -> std::process::ExitCode {
    modelpool_cli::main()
}
