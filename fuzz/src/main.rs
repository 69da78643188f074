//! One libFuzzer binary for every target: FUZZ_TARGET names which
//! (`tvix_virtiofsd::fuzz::TARGETS`).
#![no_main]
use std::sync::OnceLock;

fn target() -> fn(&[u8]) {
    static T: OnceLock<fn(&[u8])> = OnceLock::new();
    *T.get_or_init(|| {
        let name = std::env::var("FUZZ_TARGET").unwrap_or_default();
        match tvix_virtiofsd::fuzz::TARGETS.iter().find(|(n, _)| *n == name) {
            Some((_, t)) => *t,
            None => {
                let names: Vec<&str> = tvix_virtiofsd::fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
                eprintln!("set FUZZ_TARGET to one of: {}", names.join(" "));
                std::process::exit(2);
            }
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    target()(data);
});
