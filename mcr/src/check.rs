//! `mcr check`: which kernel features the engine needs are here.

pub use kext_shim::probe::Feature;

/// Probes every feature; the engine can run when no required one is missing.
pub fn run() -> (Vec<Feature>, bool) {
    let f = kext_shim::probe::probe_all();
    let ok = f.iter().all(|x| x.present || !x.required);
    (f, ok)
}

pub fn render(features: &[Feature]) -> String {
    let mut s = String::new();
    for f in features {
        let state = match (f.present, f.required) {
            (true, _) => "ok     ",
            (false, true) => "MISSING",
            (false, false) => "absent ",
        };
        let req = if f.required { "required" } else { "optional" };
        s.push_str(&format!("{state} {:<34} {req}", f.name));
        if !f.detail.is_empty() {
            s.push_str(&format!("  ({})", f.detail));
        }
        s.push('\n');
    }
    s
}
