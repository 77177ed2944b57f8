//! governor's benchmarks (`cargo xtask bench`). Placeholder until the
//! benchmark suite lands in this file.
fn main() {
    eprintln!("governor-bench: no benchmarks selected");
    std::process::exit(2);
}
