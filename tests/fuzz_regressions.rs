//! The fuzz targets (`tvix_virtiofsd::fuzz`) under `cargo test`: every
//! input kept in `fuzz/regressions/TARGET/` (what `bench/fuzz.sh` found)
//! is replayed, then a short, deterministic pass of mutations of each
//! target's seeds runs; the long, coverage-guided runs are
//! `bench/fuzz.sh`'s.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use tvix_virtiofsd::fuzz::{seeds, TARGETS};

/// Mutations per seed in the bounded pass.
const MUTATIONS: usize = 1000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u32; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff];

/// A few stacked edits of `input`: bit flips, interesting values, cuts,
/// duplicated or removed spans, a span of `other` spliced in.
fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = INTERESTING[rng.below(INTERESTING.len())] as u8;
            }
            2 if v.len() >= 4 => {
                let i = rng.below(v.len() - 3);
                let x = INTERESTING[rng.below(INTERESTING.len())];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            3 => v.truncate(rng.below(v.len() + 1)),
            4 if !v.is_empty() => {
                let a = rng.below(v.len());
                let b = (a + 1 + rng.below(64)).min(v.len());
                let span = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, span);
            }
            5 if !v.is_empty() => {
                let a = rng.below(v.len());
                let b = (a + 1 + rng.below(64)).min(v.len());
                v.drain(a..b);
            }
            6 if !other.is_empty() => {
                let a = rng.below(other.len());
                let b = (a + 1 + rng.below(256)).min(other.len());
                let at = rng.below(v.len() + 1);
                v.splice(at..at, other[a..b].iter().copied());
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

fn run(target: fn(&[u8]), name: &str, input: &[u8], what: &str) {
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
        let dir = std::env::temp_dir().join("tvix-virtiofsd-fuzz-failures");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{name}-{:016x}", blake3::hash(input).as_bytes()[0]));
        let _ = std::fs::write(&file, input);
        panic!("{name}: {what} failed; input saved to {}", file.display());
    }
}

#[test]
fn regressions_and_a_bounded_mutation_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let seeds = seeds();
    let mut replayed = 0;
    let mut executions = 0;
    for &(name, target) in TARGETS {
        let dir = root.join(name);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let input = std::fs::read(e.path()).unwrap();
                run(target, name, &input, &format!("{}", e.path().display()));
                replayed += 1;
            }
        }
        let mine: Vec<&[u8]> = seeds
            .iter()
            .filter(|(t, _)| *t == name)
            .map(|(_, s)| s.as_slice())
            .collect();
        assert!(!mine.is_empty(), "{name}: no seeds");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        for (i, seed) in mine.iter().enumerate() {
            run(target, name, seed, "a seed");
            let other = mine[(i + 1) % mine.len()];
            for _ in 0..MUTATIONS {
                let input = mutate(seed, other, &mut rng);
                run(target, name, &input, "a mutation");
                executions += 1;
            }
        }
    }
    eprintln!("fuzz: {replayed} kept inputs replayed, {executions} mutations run");
}

/// The seeds reach what they are meant to: the FUSE seeds read the
/// fixture's file (a target that rejected everything would pass above).
#[test]
fn seeds_are_accepted_inputs() {
    use prost::Message;
    let mut read_the_file = false;
    for (name, seed) in seeds() {
        match name {
            "directory" => {
                let pb = tvix_virtiofsd::wire::castore::Directory::decode(seed.as_slice()).unwrap();
                tvix_virtiofsd::castore::Directory::try_from(pb).unwrap();
            }
            "path_info" => {
                let pb = tvix_virtiofsd::wire::store::PathInfo::decode(seed.as_slice()).unwrap();
                tvix_virtiofsd::nix::path_info::PathInfo::try_from(pb).unwrap();
            }
            "path_info_json" => {
                tvix_virtiofsd::nix::path_info_json::parse_path_info_json(&seed).unwrap();
            }
            "nar" => assert!(seed.starts_with(b"\x0d\0\0\0\0\0\0\0nix-archive-1")),
            "fuse_request" => {
                let replies = tvix_virtiofsd::fuzz::fuse_session(&seed);
                // every request is answered (a header at least; FORGET
                // gets no answer), none with an error
                let answered: Vec<&Vec<u8>> = replies.iter().filter(|r| !r.is_empty()).collect();
                assert!(answered.len() + 1 >= replies.len(), "{replies:?}");
                assert!(answered.iter().all(|r| r.len() >= 16), "{replies:?}");
                let errors: Vec<i32> = answered
                    .iter()
                    .map(|r| i32::from_le_bytes([r[4], r[5], r[6], r[7]]))
                    .collect();
                assert!(errors.iter().all(|&e| e == 0), "errors {errors:?}");
                read_the_file |= replies
                    .iter()
                    .any(|r| r.windows(13).any(|w| w == b"hello, fuzzer"));
            }
            _ => {}
        }
    }
    assert!(read_the_file, "no FUSE seed read the fixture's file");
}

/// Writes each target's seeds under $FUZZ_SEEDS_DIR/TARGET/ for
/// `bench/fuzz.sh` (ignored in a normal run).
#[test]
#[ignore]
fn write_seeds() {
    let dir = std::path::PathBuf::from(std::env::var_os("FUZZ_SEEDS_DIR").expect("FUZZ_SEEDS_DIR"));
    for (i, (name, seed)) in seeds().into_iter().enumerate() {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("seed-{i:02}")), seed).unwrap();
    }
    for &(name, _) in TARGETS {
        std::fs::create_dir_all(dir.join(name)).unwrap();
    }
}
