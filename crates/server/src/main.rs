//! The `modelpool` binary; everything lives in [`modelpool_server::cli`].

fn main() -> std::process::ExitCode {
    modelpool_server::cli::main()
}
