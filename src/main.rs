//! The `ctguard` binary: everything lives in the library; see `ctguard::cli`.

fn main() {
    std::process::exit(ctguard::cli::main());
}
