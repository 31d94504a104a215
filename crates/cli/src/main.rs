//! The `modelpool` binary; everything lives in [`modelpool_cli`].

fn main() -> std::process::ExitCode {
    modelpool_cli::main()
}
