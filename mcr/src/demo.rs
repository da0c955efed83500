use std::process::ExitCode;
pub fn run(_m: usize) -> ExitCode {
    ExitCode::SUCCESS
}
pub fn workload(_m: usize) -> ExitCode {
    ExitCode::SUCCESS
}
