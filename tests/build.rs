//! Builds the C workload programs the integration tests drive.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("workloads");
    std::fs::create_dir_all(&out).expect("creating the workloads output directory");
    let src = PathBuf::from("workloads");
    println!("cargo:rerun-if-changed=workloads");
    for entry in std::fs::read_dir(&src).expect("reading tests/workloads") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("c") {
            continue;
        }
        let name = path
            .file_stem()
            .expect("file stem")
            .to_string_lossy()
            .into_owned();
        let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-O2", "-Wall", "-Werror", "-mavx", "-o"])
            .arg(out.join(&name))
            .arg(&path)
            .status()
            .expect("running the C compiler (install gcc)");
        assert!(status.success(), "compiling workload {name} failed");
    }
    println!("cargo:rustc-env=MCR_WORKLOADS={}", out.display());
}
